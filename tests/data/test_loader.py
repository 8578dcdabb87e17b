"""The shared loader: every training token once per epoch, held-out documents never trained on,
exact resume from any state (Grain's checkpoint round-trip pattern), prefetch equal to direct
draws, and a process reading only the documents of its own rows."""

import collections
import json
import types

import numpy as np
import pytest

from mixtral_jax.data import loader


def _corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, rng.integers(1, 70)).astype(np.int32) for _ in range(n)]


def _pieces(batch_rows):
    """{(document, start, length)} of rows as the packer gives them."""
    return {tuple(row[i : i + 3]) for row in batch_rows for i in range(0, len(row), 3)}


def test_one_epoch_places_every_training_token_once_and_no_held_out_one():
    docs = loader.Documents(_corpus())
    split = loader.Split(docs.num_docs, 0.1, seed=3)
    it = loader.BatchIterator(docs, split, 2, 15, seed=3)
    it.packer.epochs = 1  # the rows of epoch 0 only
    rows = it.packer.take(10**9)
    held = set(split.held().tolist())
    assert len(held) == 4
    want = sorted(
        (d, s)
        for d in range(docs.num_docs)
        if d not in held
        for s in range(docs.lengths([d])[0])
        if not (s % 16 == 0 and s == docs.lengths([d])[0] - 1)  # a 1-token tail piece
    )
    got = sorted((d, s + i) for d, s, n in _pieces(rows) for i in range(n))
    assert got == want  # each once: no duplicate, no skip
    assert all(sum(r[2::3]) <= 16 for r in rows)


def test_batches_keep_documents_apart_and_positions_restart():
    docs = loader.Documents(_corpus())
    it = loader.BatchIterator(docs, loader.Split(docs.num_docs, 0.0, 0), 4, 15, seed=1)
    for _ in range(6):
        b = next(it)
        seg, pos = b["segment_ids"], b["positions"]
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        np.testing.assert_array_equal(b["loss_mask"][:, :-1], same.astype(np.float32))
        starts = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
        assert (pos[:, 1:][starts] == 0).all()
        np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])


def test_resuming_from_every_state_gives_the_same_batches():
    """Grain's assert_equal_output_after_checkpoint: for each of K states across epoch
    boundaries, a fresh iterator restored there draws the same next M batches; the state is
    JSON and round-trips."""
    docs = loader.Documents(_corpus(24))
    make = lambda: loader.BatchIterator(docs, loader.Split(24, 0.1, 0), 3, 11, seed=5)
    ref, states, stream = make(), [], []
    for _ in range(60):
        states.append(json.loads(json.dumps(ref.state)))
        stream.append(next(ref)["tokens"])
    assert ref.packer.epoch >= 2  # two epoch boundaries crossed
    for i in range(0, 60, 7):
        fresh = make()
        fresh.restore(states[i])
        assert fresh.state == states[i]
        for j in range(i, min(i + 20, 60)):
            np.testing.assert_array_equal(next(fresh)["tokens"], stream[j])
    with pytest.raises(loader.ConfigError, match="is not this data pipeline's"):
        make().restore({"epoch": 0, "index": 6})  # a state of the old in-memory iterator


def test_prefetch_hands_out_the_same_batches_and_the_state_of_the_last_one():
    docs = loader.Documents(_corpus())
    make = lambda: loader.BatchIterator(docs, loader.Split(40, 0.0, 0), 2, 15, seed=2)
    direct, ahead = make(), loader.Prefetch(make(), depth=3)
    for _ in range(8):
        np.testing.assert_array_equal(next(ahead)["tokens"], next(direct)["tokens"])
        assert ahead.state == direct.state  # not the state of the batches drawn ahead
    ahead.close()
    failing = loader.Prefetch(_Broken(docs, loader.Split(40, 0.0, 0), 2, 15, seed=2))
    next(failing), next(failing)  # an error while drawing reaches the consumer, at its batch
    with pytest.raises(loader.ConfigError, match="shard 000003 is cut short"):
        next(failing)


class _Broken(loader.BatchIterator):
    drawn = 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == 3:
            raise loader.ConfigError("shard 000003 is cut short")
        return super().__next__()


def test_a_process_reads_only_the_documents_of_its_rows():
    docs = loader.Documents(_corpus())
    reads = {0: [], 1: [], "full": []}
    its = {}
    for p in (0, 1, "full"):
        its[p] = loader.BatchIterator(docs, loader.Split(40, 0.0, 0), 4, 15, seed=2)
        if p != "full":
            its[p].select(np.array([0, 1]) + 2 * p)
        original = docs.read
        its[p].documents = types.SimpleNamespace(read=None)  # the same, reads recorded
        its[p].documents.read = lambda d, a, b, p=p, f=original: (
            reads[p].append((d, a)) or f(d, a, b)
        )
    for _ in range(5):
        want = next(its["full"])["tokens"]
        got = [next(its[p])["tokens"] for p in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(got), want)
    # every slice the batches need is read by exactly one of the two processes
    assert reads[0] and reads[1]
    assert collections.Counter(reads[0]) + collections.Counter(reads[1]) == collections.Counter(
        reads["full"]
    )


def test_the_pieces_of_a_long_document_spread_over_many_batches():
    """Packed in order, a 50-row document fills six batches of 8 straight; drawn from the pool,
    no batch holds more than 4 of its rows (and the epoch still holds all 50)."""
    long = np.arange(3, 803, dtype=np.int32) % 400 + 3  # 800 tokens: 50 rows of 16
    short = [np.full(15, 7 + i % 300, np.int32) for i in range(2000)]
    docs = loader.Documents([long, *short])
    it = loader.BatchIterator(docs, loader.Split(docs.num_docs, 0.0, 0), 8, 15, seed=0)
    it.packer.epochs = 1
    counts = []
    while batch := it.packer.take(8):
        counts.append(sum(row[0] == 0 for row in batch))  # rows starting with document 0
    assert sum(counts) == 50 and max(counts) <= 4, counts
