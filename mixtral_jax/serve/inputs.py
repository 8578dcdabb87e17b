"""The host inputs of the engine's two compiled calls (`steps.py`), packed into their shapes.

Both take rows of the engine (slots 0 .. max_batch - 1 of `Scheduler.rows`) packed into the first
rows of a compiled shape, the rest idle: an idle row feeds slot max_batch (out of range: it reads a
fill token and its sample is dropped) and its table is all sink, so what it writes goes to the
sink block. `rows` below is the engine's row list and `tables` its [max_batch, R] host block table.
"""

from __future__ import annotations

import numpy as np

from mixtral_jax.generate.sampling import RowSampling
from mixtral_jax.serve.rows import Row
from mixtral_jax.serve.steps import idle_sampling


def row_sampling(rows: list[Row | None]) -> RowSampling:
    """RowSampling host arrays for `rows` (None: idle, greedy)."""
    out = idle_sampling(len(rows))
    for j, row in enumerate(rows):
        if row is not None:
            params = row.request.sampling
            out.temperature[j], out.top_k[j] = params.temperature, params.top_k
            out.top_p[j], out.seed[j] = params.top_p, row.request.seed
            out.counter[j] = row.dispatched  # the index of the token it samples
    return out


def decode_inputs(
    rows: list[Row | None], decoding: list[int], tables: np.ndarray, batch: int
) -> tuple[tuple, int]:
    """The decode step of rows `decoding` in a compiled batch of b = `batch` rows: ((slots [b]:
    the row whose last token each batch row feeds, max_batch for idle ones; block_table [b, R],
    lengths [b], active [b], sampling), tokens its widest row needs). Output row j is row
    decoding[j]'s token."""
    slots = np.full(batch, len(rows), np.int32)
    lengths, active = np.zeros(batch, np.int32), np.zeros(batch, bool)
    table = np.zeros((batch, tables.shape[1]), np.int32)  # idle rows write to the sink
    running = [rows[i] for i in decoding]
    for j, (i, row) in enumerate(zip(decoding, running)):
        slots[j], lengths[j], active[j] = i, row.cached, True
    table[: len(decoding)] = tables[decoding]
    sampling = row_sampling(running + [None] * (batch - len(running)))
    return (slots, table, lengths, active, sampling), int(lengths.max(initial=0)) + 1


def chunk_cuts(
    rows: list[Row | None], prefilling: list[int], pieces: dict[int, int], chunk: int
) -> list[tuple[int, int, int]]:
    """pieces[i] new tokens of each row i of `prefilling` cut into chunks of at most `chunk`:
    (row, index of its first token, tokens) per chunk, row after row, in token order."""
    return [
        (i, at, min(chunk, rows[i].cached + pieces[i] - at))
        for i in prefilling
        for at in range(rows[i].cached, rows[i].cached + pieces[i], chunk)
    ]


def chunk_inputs(
    rows: list[Row | None], cuts: list[tuple[int, int, int]], tables: np.ndarray, chunk: int, q: int
) -> tuple[tuple, int, dict[int, int]]:
    """The prefill group of `cuts` (`chunk_cuts`), one chunk per group row, in a compiled group
    of q rows: ((tokens [q, C], block_table [q, R], lengths [q], counts [q], sampling, slots
    [q]: the row whose last token a final chunk's sample becomes, max_batch for other chunks),
    tokens its widest row needs, {i: the group row of row i's final chunk}).

    The chunks of one row share its table and follow each other (lengths cached, cached + C,
    ...): each layer writes every group row's keys before any attends, so a chunk sees those
    before it in the same call. A row's final chunk samples its next token (a new request its
    first, a recomputed one the one after those it had generated)."""
    tokens, lengths = np.zeros((q, chunk), np.int32), np.zeros(q, np.int32)
    counts, slots = np.zeros(q, np.int32), np.full(q, len(rows), np.int32)
    table = np.zeros((q, tables.shape[1]), np.int32)  # idle rows write to the sink
    finals = {}
    for j, (i, at, n) in enumerate(cuts):
        row = rows[i]
        tokens[j, :n] = row.context[at : at + n]
        lengths[j], counts[j], table[j] = at, n, tables[i]
        if at + n == len(row.context):
            slots[j], finals[i] = i, j
    sampling = row_sampling([rows[i] for i, _, _ in cuts] + [None] * (q - len(cuts)))
    need = int((lengths + counts).max())
    return (tokens, table, lengths, counts, sampling, slots), need, finals
