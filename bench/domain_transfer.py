"""Does one expert carry a second domain? Held-out perplexity on two domains, CPU-sized.

  python bench/domain_transfer.py [--base-steps 200] [--steps 100] [--expert 1] [--out DIR]

Domain 1: Python's documentation topics (`builtin:pydoc`); domain 2: Python's own standard
library source (`.py` files of the running interpreter). Nothing is downloaded. Each domain's
documents are split 90/10 into training and held-out files (seeded). Then, all with train.py's
trainer on the tiny preset, one tokenizer (trained on domain 1 by the base run):

  base        trained from scratch on domain 1 (--base-steps)
  full        base, every weight fine-tuned on domain 2 (--steps)
  expert      base, only expert k (its three matrices, every layer) trained on domain 2
  swap        a donor trained from scratch on domain 2 (--base-steps), its expert k swapped into
              the base (`surgery swap`), then only that expert trained on domain 2 (--steps)
  lora        base + LoRA rank 8 on attention and experts, trained on domain 2, merged

and prints one JSON line: held-out loss and perplexity of each model on both domains, the
trained parameter count and the optimizer-state bytes of each fine-tuning run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np


def write_domains(root: str, seed: int = 0, max_files: int = 400) -> dict:
    """{domain: (train.jsonl, heldout.jsonl)} under `root`."""
    from mixtral_jax.train import data

    pydoc = data.read_documents("builtin:pydoc")
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = np.random.default_rng(seed)
    stdlib = [stdlib[i] for i in sorted(rng.permutation(len(stdlib))[:max_files])]
    source = []
    for path in stdlib:
        with open(path, encoding="utf-8", errors="replace") as f:
            source.append(f.read()[:20000])  # long modules cut: the domain, not one file
    out = {}
    for name, docs in (("docs", pydoc), ("code", source)):
        train, held = data.split_documents(docs, 0.1, seed)
        paths = []
        for part, items in (("train", train), ("heldout", held)):
            path = os.path.join(root, f"{name}_{part}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in items)
            paths.append(path)
        out[name] = tuple(paths)
    return out


def perplexity(cfg, params, tokenizer, text_path: str, seq_len: int, rows: int = 64) -> float:
    import jax
    import jax.numpy as jnp

    from mixtral_jax.model.params import from_params
    from mixtral_jax.train import data, losses

    docs = data.tokenize_documents(data.read_documents(text_path), tokenizer)
    packed = data.pack(docs, seq_len, seed=0)
    batch = data.make_batch(packed, np.arange(min(packed.num_rows, rows)))
    model = from_params(cfg, params)
    logits = jax.jit(lambda t, p, s: model(t, positions=p, segment_ids=s).logits)(
        *(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids"))
    )
    nll, count = losses.cross_entropy(
        logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])
    )
    return float(nll / count)


def train(run_dir: str, source: str, steps: int, *overrides: str) -> dict:
    from mixtral_jax.train import trainer
    from mixtral_jax.train.config import load_run_config

    common = [
        f"checkpoint.dir={run_dir}",
        f"data.source={source}",
        f"train.steps={steps}",
        "data.eval_fraction=0.0",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.warmup_steps=10",
        "train.log_every=50",
        f"checkpoint.save_every={steps}",
    ]
    cfg = load_run_config(None, [*common, *overrides])
    start = time.time()
    trainer.run(cfg, show_progress=False)
    return {"seconds": round(time.time() - start, 1)}


def _state_bytes(run_dir: str) -> tuple[int, int]:
    """(trained parameters, optimizer-state bytes) of a run's last checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    from mixtral_jax.checkpoint.train import TrainCheckpointer

    ckpt = TrainCheckpointer(run_dir, keep=1, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    state = ckpt.manager.restore(ckpt.steps()[-1], args=args)["state"]
    ckpt.close()
    params = sum(np.asarray(x).size for x in jax.tree.leaves(state["params"]))
    opt = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["opt_state"]))
    return int(params), int(opt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--expert", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=None, help="work directory (default: a fresh temp dir)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from mixtral_jax import checkpoint
    from mixtral_jax.surgery import cli as surgery
    from mixtral_jax.tokenizer import Tokenizer

    root = args.out or tempfile.mkdtemp(prefix="domain_transfer_")
    os.makedirs(root, exist_ok=True)
    domains = write_domains(root)
    (docs_train, _), (code_train, _) = domains["docs"], domains["code"]
    lr = f"train.lr={args.lr}"
    runs, e = {}, args.expert
    base = os.path.join(root, "base")
    runs["base"] = train(base, docs_train, args.base_steps, lr, "data.tokenizer=train")
    start = f"checkpoint.init_from={base}/model"
    tok = f"data.tokenizer={base}/tokenizer.model"
    only_e = f'train.trainable=["layers.*.moe.experts[{e}]"]'
    runs["full"] = train(f"{root}/full", code_train, args.steps, lr, start)
    runs["expert"] = train(f"{root}/expert", code_train, args.steps, lr, start, only_e)
    runs["donor"] = train(f"{root}/donor", code_train, args.base_steps, lr, tok)
    swapped = f"{root}/swapped"
    surgery.main(
        ["swap", "--checkpoint", f"{base}/model", "--donor", f"{root}/donor/model"]
        + ["--expert", str(e), "--out", swapped]
    )
    runs["swap"] = train(
        f"{root}/swap", code_train, args.steps, lr, f"checkpoint.init_from={swapped}", only_e
    )
    lora_targets = (
        'train.lora_targets=["q_proj","k_proj","v_proj","o_proj","w_gate","w_up","w_down"]'
    )
    runs["lora"] = train(
        f"{root}/lora", code_train, args.steps, lr, start, "train.lora_rank=8", lora_targets
    )
    surgery.main(
        ["merge-lora", "--checkpoint", f"{base}/model", "--adapters", f"{root}/lora/model"]
        + ["--out", f"{root}/lora_merged"]
    )

    tokenizer = Tokenizer.load(f"{base}/tokenizer.model")
    models = {
        "base": f"{base}/model",
        "full": f"{root}/full/model",
        "expert": f"{root}/expert/model",
        "donor": f"{root}/donor/model",
        "swap_untrained": swapped,
        "swap": f"{root}/swap/model",
        "lora": f"{root}/lora_merged",
    }
    results = {}
    for name, path in models.items():
        cfg, params = checkpoint.load_model(path)
        row = {}
        for domain, (_, held) in domains.items():
            loss = perplexity(cfg, params, tokenizer, held, 64)
            row[domain] = {"loss": round(loss, 4), "perplexity": round(float(np.exp(loss)), 2)}
        if name in ("full", "expert", "swap", "lora"):
            row["trained_params"], row["optimizer_bytes"] = _state_bytes(f"{root}/{name}")
        row.update(runs.get(name, {}))
        results[name] = row
    import jax

    print(
        json.dumps(
            {
                "bench": "domain_transfer",
                "date": time.strftime("%Y-%m-%d"),
                "jax": jax.__version__,
                "python": sys.version.split()[0],
                "base_steps": args.base_steps,
                "steps": args.steps,
                "expert": e,
                "lr": args.lr,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
