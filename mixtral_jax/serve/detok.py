"""Incremental detokenisation with stop strings, for streamed completions.

SentencePiece text is only defined for a whole id sequence: a piece alone loses its leading
space at the start of a decode, and a character split over byte-fallback pieces decodes to
U+FFFD until its last byte arrives. Decoding everything again at every token would cost O(n^2);
instead (vLLM's window) each token decodes a short window `ids[prefix:]` and keeps what it adds
to `ids[prefix:read]`, both decodes starting at the same piece, so the leading-space rule cuts
both alike. A window ending in U+FFFD waits for more bytes. The oracle test checks the result
against one `decode` of all ids.

Most tokens need no decode at all: a normal piece (no byte fallback, no control) appended when
nothing waits for bytes and the text so far is not empty adds exactly its piece with '▁' as a
space (`Tokenizer.continuation`), so the window moves on by a lookup. At 256 streams the two
decodes a token cost a large share of the server's event loop (BENCHMARKS.md).

Stop strings: the text is searched as it grows; at the first stop string it is cut before it,
and the tokens after the one that completed it are dropped. While streaming, text that could be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TextStream:
    """Text of a growing token sequence, cut at the first stop string.

    Attributes:
      text: the decoded text so far (cut before a stop string once one is found).
      tokens: the ids taken (none after the one that completed a stop string).
      stopped: a stop string was found.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self._decode = tokenizer.decode
        self._continuation, self._silent = tokenizer.continuation, tokenizer.silent
        self._window_has_text = False  # ids[prefix:read] decode to some text
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = 0  # decode window: ids[prefix:read] is already in text
        self._searched = 0  # text[:searched] holds no stop string
        self._sent = 0  # characters handed out by take()

    def add(self, ids) -> int:
        """Takes new token ids; returns how many were kept (fewer once a stop string ends it)."""
        kept = 0
        for token in ids:
            if self.stopped:
                break
            self.tokens.append(int(token))
            kept += 1
            if not self._append_piece():
                self._grow(final=False)
        return kept

    def _append_piece(self) -> bool:
        """The last token's text by lookup, where that is exact (see the module doc)."""
        if self._read != len(self.tokens) - 1 or not self._window_has_text:
            return False
        piece = self._continuation(self.tokens[-1])
        if piece is None:
            return False
        self.text += piece
        self._prefix, self._read = self._read, len(self.tokens)
        self._search()
        return True

    def finish(self) -> None:
        """The sequence is complete: text still waiting for bytes is added as it decodes."""
        if not self.stopped:
            self._grow(final=True)

    def _grow(self, final: bool) -> None:
        window = self._decode(self.tokens[self._prefix :])
        if window.endswith(REPLACEMENT) and not final:
            return  # a character split over pieces: wait for its last byte
        before = self._decode(self.tokens[self._prefix : self._read])
        self.text += window[len(before) :]
        if any(not self._silent(t) for t in self.tokens[self._read :]):
            self._prefix = self._read  # else keep the window's start: see `_window_has_text`
        self._read = len(self.tokens)
        # A window must start at a piece with text: one starting at silent ids (a control
        # token, say) decodes its first piece as a text's first, without its leading space.
        self._window_has_text = any(not self._silent(t) for t in self.tokens[self._prefix :])
        self._search()

    def _search(self) -> None:
        if not self.stops:
            return
        start = max(0, self._searched - self._longest + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
        self._searched = len(self.text)

    def take(self, final: bool = False) -> str:
        """The text not handed out yet; unless `final` (or stopped), without a tail that could
        still become a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        out = self.text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
