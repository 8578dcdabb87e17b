"""train.py's start-up without the training, for the two-process data test: starts the run's
processes as train.py does, builds the run's data and mesh through the trainer, draws the first
batches of this process's rows, and writes them, with every document slice it read, to
<checkpoint.dir>/rows_<process>.json."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BATCHES = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--coordinator", "--num-processes", "--process-id"):
        parser.add_argument(flag, type=str if flag == "--coordinator" else int)
    args, overrides = parser.parse_known_args()
    from mixtral_jax.parallel import distributed
    from mixtral_jax.train import trainer
    from mixtral_jax.train.config import load_run_config

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    cfg = load_run_config(None, [o[2:] for o in overrides])
    _, documents, batches, _ = trainer._prepare_data(cfg)
    reads, read = [], documents.read
    documents.read = lambda doc, start, stop: (
        reads.append([doc, start, stop]) or read(doc, start, stop)
    )
    trainer._load_local_rows(cfg, trainer.make_run_mesh(cfg), batches)
    tokens = [next(batches)["tokens"].tolist() for _ in range(BATCHES)]
    out = {"local": batches.local.tolist(), "tokens": tokens, "reads": reads}
    with open(os.path.join(cfg.checkpoint.dir, f"rows_{args.process_id}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
