"""Which rows of the batch run each step, and with which KV blocks (the engine thread's policy).

Blocks are taken as tokens fill them; nothing is reserved ahead, so a pool smaller than every
row at its longest serves them all. Each step (`plan`):
  1. with a sliding window, rows free the blocks that left their window (`slide`);
  2. oldest first, every decoding row takes the block its next token may need, and the
     prefilling rows those of their next prompt tokens, up to the step's budget of N = P // C
     chunks of C tokens (P the prefill budget): a prompt shorter than C takes one chunk, a
     longer one as many as the budget has left (the engine runs each chunk in a row of the
     step's prefill group, so one call prefills a burst of short prompts, or several chunks of
     one long one). A row the pool cannot hold preempts the youngest rows until it fits
     (vLLM's recompute preemption: the victim's blocks return at once, its request goes back
     to the head of the queue with the tokens it generated, and later prefills prompt +
     generated and samples on from there, so its stream sees every token once). The youngest
     row itself, when short, is preempted if decoding, or prefills what the free blocks hold
     (nothing: it waits);
  3. if nothing was preempted, waiting requests take free rows, first come first served, while
     the pool holds the head's whole context beside a block per decoding row (one admitted
     into less would be the first preempted again, its prefill wasted); each new row
     prefills in this step with the chunks of the budget still unused.
The oldest row is never preempted and alone always fits (the engine refuses a request that
alone needs more than the pool), so every request finishes.
"""

from __future__ import annotations

import collections
import threading

from mixtral_jax.serve.blocks import BlockTables, blocks_at_once
from mixtral_jax.serve.rows import Event, Row, Stream


class Scheduler:
    """The batch's rows, the waiting queue and the block tables.

    Args:
      max_batch: B rows; prefill_chunk: C, prompt tokens per chunk (one row of the step's
        prefill group); prefill_budget: P, prompt tokens per step at most (N = P // C chunks).
      tables: the pool's block tables; window: the model's sliding window (None: none).
      cond: the engine's condition, which guards `waiting` (submit appends from any thread).

    Attributes:
      rows: [B] the row of each batch slot, None when free.
      waiting: streams waiting for a row, preempted ones first (oldest first among them).
      preemptions: rows preempted so far.
    """

    def __init__(
        self,
        *,
        max_batch: int,
        prefill_chunk: int,
        prefill_budget: int,
        tables: BlockTables,
        window: int | None,
        cond: threading.Condition,
    ):
        self.rows: list[Row | None] = [None] * max_batch
        self.waiting: collections.deque[Stream] = collections.deque()
        self.tables, self.window, self._cond = tables, window, cond
        self.prefill_chunk = prefill_chunk
        self.prefill_chunks = prefill_budget // prefill_chunk  # N, chunks per step
        self.preemptions = self._admitted = 0
        self._preempted: dict[str, Row] = {}  # stream id -> its row, while it waits again

    def live(self) -> list[int]:
        """Slots holding a row."""
        return [i for i, r in enumerate(self.rows) if r is not None]

    def plan(self) -> tuple[list[int], list[int], dict[int, int]]:
        """Steps 1-3 of the module docstring: (decoding rows, prefilling rows, {prefilling row:
        its new prompt tokens this step, in ceil(tokens / C) chunks, N chunks in all at most}),
        each row holding the blocks its new tokens fill."""
        self._slide()
        decoding, prefilling, pieces = [], [], {}
        before, chunks = self.preemptions, self.prefill_chunks
        for i in sorted(self.live(), key=lambda i: self.rows[i].order):
            row = self.rows[i]
            if row is None:  # preempted by an older row
                continue
            if not row.prefilling:
                if row.sampled_all:  # waits for the delivery of its last token
                    continue
                if self._grant(i, 1):
                    decoding.append(i)
                else:
                    self.preempt(i)
            elif chunks:
                want = min(chunks * self.prefill_chunk, len(row.context) - row.cached)
                pieces[i] = self._grant(i, want)
                if pieces[i]:
                    prefilling.append(i)
                    chunks -= self.chunks(pieces[i])
        if self.preemptions == before:
            self._admit(prefilling, pieces, len(decoding), chunks)
        return decoding, prefilling, pieces

    def chunks(self, tokens: int) -> int:
        """Chunks of C tokens that `tokens` prompt tokens of one row fill."""
        return -(-tokens // self.prefill_chunk)

    def _slide(self) -> None:
        """With a sliding window W, rows free the blocks wholly older than the first key their
        next query sees (index cached - W + 1)."""
        if self.window is not None:
            for i in self.live():
                self.tables.slide(i, self.rows[i].cached - self.window + 1)

    def _grant(self, i: int, want: int) -> int:
        """Row i takes blocks for its next `want` tokens, preempting younger rows while the
        pool is short; the youngest takes what is free. Returns the tokens granted."""
        row, tables = self.rows[i], self.tables
        end = row.cached + want
        while tables.short(i, end) > tables.free:
            younger = [  # those holding blocks: preempting one that holds none frees nothing
                j for j in self.live() if self.rows[j].order > row.order and tables.held(j)
            ]
            if not younger:
                end = min(end, tables.covered(i) + tables.free * tables.block_size)
                break
            self.preempt(max(younger, key=lambda j: self.rows[j].order))
        granted = max(0, end - row.cached)
        tables.cover(i, row.cached + granted)
        return granted

    def preempt(self, i: int) -> None:
        """Row i gives back its slot and blocks and waits at the head of the queue; what it
        generated is kept (its stream saw those tokens) and recomputed when it runs again."""
        self.preemptions += 1
        self.requeue(i)

    def requeue(self, i: int) -> None:
        """Row i back to the queue's head, behind preempted rows older than it, nothing cached."""
        row = self.rows[i]
        self.tables.release(i)
        self.rows[i] = None
        row.evict()
        with self._cond:
            at = 0
            while at < len(self.waiting):
                ahead = self._preempted.get(self.waiting[at].id)
                if ahead is None or ahead.order > row.order:
                    break
                at += 1
            self._preempted[row.stream.id] = row
            self.waiting.insert(at, row.stream)

    def _admit(
        self, prefilling: list[int], pieces: dict[int, int], reserve: int, chunks: int
    ) -> None:
        """Step 3: free slots to the head of the queue while the pool holds its whole context
        (prompt, or prompt + generated after a preemption; with a window, what the window
        needs) beside `reserve` blocks. The head waits rather than be overtaken (no
        starvation). The new row takes the blocks of what it prefills in this step (as many of
        the `chunks` still unused as its context fills), or with none left of its first
        chunk."""
        z = self.tables.block_size
        while None in self.rows:
            with self._cond:
                if not self.waiting:
                    return
                stream = self.waiting[0]
                row = self._preempted.get(stream.id) or Row(stream, 0, list(stream.request.prompt))
                want = min(max(chunks, 1) * self.prefill_chunk, len(row.context))
                if self.tables.free - reserve < blocks_at_once(len(row.context), z, self.window):
                    return
                self.waiting.popleft()
                self._preempted.pop(stream.id, None)
            if not row.order:
                self._admitted += 1
                row.order = self._admitted
            i = self.rows.index(None)
            self.rows[i] = row
            granted = min(want, (self.tables.free - reserve) * z)
            self.tables.cover(i, granted)
            if chunks:
                prefilling.append(i)
                pieces[i] = granted
                chunks -= self.chunks(granted)

    def leave(self, i: int, event: Event) -> None:
        """Row i's request ends with `event`: its blocks return at once."""
        row = self.rows[i]
        self.tables.release(i)
        self.rows[i] = None
        row.stream.put(event)

    def drop_cancelled(self) -> list[Stream]:
        """Removes the cancelled streams from the queue; returns them."""
        with self._cond:
            gone = [s for s in self.waiting if s.cancelled]
            for stream in gone:
                self.waiting.remove(stream)
                self._preempted.pop(stream.id, None)
        return gone

    def drop_waiting(self) -> list[Stream]:
        """Empties the queue; returns what waited."""
        with self._cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
            self._preempted.clear()
        return waiting
