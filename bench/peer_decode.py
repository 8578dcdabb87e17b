"""The PyTorch peer for bench/decode.py: transformers' MixtralForCausalLM (full 8x7B, random bf16
weights) greedy `generate` on CUDA.

  python bench/peer_decode.py --batches 1,8,64 --new 128   (prints one JSON line; run by decode.py)

Same shapes as ours: 16-token random prompts, `new` tokens forced (min_new_tokens), greedy.
tokens/s = batch x (new - 1) / (time of generate(new) - time of generate(1)), so the prompt's
prefill and the first token are left out, as in ours. Median of --repeats (3) after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    import torch
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM

    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = MixtralConfig(num_hidden_layers=args.layers)  # defaults: Mixtral 8x7B
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)
    model.eval()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def seconds(ids, new):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
        sync()
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - start

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (batch, 16), device=args.device)
        seconds(ids, 4)  # warm-up
        full = sorted(seconds(ids, args.new) for _ in range(args.repeats))[args.repeats // 2]
        first = sorted(seconds(ids, 1) for _ in range(args.repeats))[args.repeats // 2]
        rows.append(
            {
                "batch": batch,
                "decode_tokens_per_s": batch * (args.new - 1) / (full - first),
                "generate_s": full,
                "first_token_s": first,
            }
        )
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "experts_implementation": str(getattr(cfg, "_experts_implementation", None)),
                "attn_implementation": str(getattr(cfg, "_attn_implementation", None)),
                "layers": args.layers,
                "new": args.new,
                "decode": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
