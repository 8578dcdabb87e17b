"""Training data that streams: corpora tokenized into memory-mapped shards (`prepare`), read
back as packed rows in a seeded order with a resumable state (`loader`).

records.py      corpus files -> work units -> document texts (bad records named or skipped)
shards.py       the on-disk format: token shards + document offsets, memory-mapped reader
prepare.py      the `prepare` command: parallel tokenization into shards, resumable
permutation.py  a seeded permutation evaluated at any index (O(1) memory)
packing.py      streaming first-fit packing of documents into rows, with a JSON state
loader.py       documents (in memory or shards) -> held-out split -> batches, prefetched
"""
