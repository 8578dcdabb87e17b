"""Train a Mixtral-style MoE model.

  python train.py                                   # tiny model, built-in corpus, CPU-friendly
  python train.py --config configs/tiny.toml --train.steps=500 --train.lr=1e-3

Restart the same command after an interruption to resume from the last complete checkpoint.

Several processes (one per host): give each --coordinator HOST:PORT --num-processes N
--process-id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); TPU pods, SLURM
and Open MPI are detected without flags. The mesh comes from --mesh.data=... etc.
"""

import argparse
import os
import sys

from mixtral_jax.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="TOML run config (default: built-in defaults)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, help="processes in the run")
    parser.add_argument("--process-id", type=int, help="this process's index, 0-based")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        print(
            f"error: unrecognised argument {bad[0]!r}: overrides look like --section.key=value",
            file=sys.stderr,
        )
        return 2
    from mixtral_jax.parallel import distributed
    from mixtral_jax.train import trainer
    from mixtral_jax.train.config import load_run_config

    cfg = None
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        cfg = load_run_config(args.config, overrides)
        result = trainer.run(cfg)
    except (ConfigError, trainer.NumericsHalt, RuntimeError, OSError) as e:
        print(f"error: {_one_line(e, cfg, trainer.LOG_FILE)}", file=sys.stderr)
        if cfg is not None and os.path.isdir(cfg.checkpoint.dir):  # shutdown noise: to the log
            trainer.keep_library_logs_in(os.path.join(cfg.checkpoint.dir, trainer.LOG_FILE))
        return 1
    if result.get("complete"):
        model = f"{cfg.checkpoint.dir}/{trainer.MODEL_DIR}"
        print(
            f"run complete: step {result['step']} of train.steps={cfg.train.steps} is already "
            f"trained in {cfg.checkpoint.dir}; model checkpoint: {model} "
            f"({'written now' if result['model_written'] else 'unchanged'})"
        )
        return 0
    if result.get("step", 0) < cfg.train.steps:
        return 0  # stopped by a signal, checkpoint saved
    line = (
        f"done: step {result['step']}, train loss {result['loss']:.3f}, "
        f"unigram entropy {result['unigram_entropy']:.3f}"
    )
    if "eval_loss" in result:
        line += (
            f", eval loss {result['eval_loss']:.3f} (perplexity {result['eval_perplexity']:.1f})"
        )
    print(line)
    print(f"model checkpoint: {cfg.checkpoint.dir}/model")
    return 0


def _one_line(error: Exception, cfg, log_file: str) -> str:
    """The first line of `error`; for an error beyond a bad setting, where the full report is."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if cfg is not None and not isinstance(error, ConfigError):
        log = os.path.join(cfg.checkpoint.dir, log_file)
        if os.path.isfile(log):
            text += f" (details in {log})"
    return text


if __name__ == "__main__":
    sys.exit(main())
