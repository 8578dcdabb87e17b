"""The PyTorch peer for bench/train_step.py: a transformers MixtralForCausalLM training step.

  python bench/peer_train_step.py --layers 2 --batch 4 --seq 4096   (prints one JSON line)

Same model as ours (Mixtral 8x7B widths, reduced depth, vocab 32000, random init), float32 master
weights with bf16 autocast, SDPA attention, loss = CE + 0.02 x load-balancing loss (transformers'
own `output_router_logits`), clipping at 1.0, fused AdamW at a constant 1e-4 on one repeated batch
(its loss falls fast: only the time is compared). Median of 10 steps after 3 warm-ups.
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
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=args.seq,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MixtralForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    inputs = torch.randint(3, 32000, (args.batch, args.seq), device="cuda")
    labels = inputs  # transformers shifts the labels itself

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "layers": args.layers,
                "batch": args.batch,
                "seq": args.seq,
                "step_ms": 1e3 * step_s,
                "tokens_per_s": args.batch * args.seq / step_s,
                "loss": float(loss),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
    )


if __name__ == "__main__":
    main()
