"""The PyTorch peer for bench/moe_layer.py: transformers' MixtralSparseMoeBlock, bf16, on CUDA.

  python bench/peer_moe.py --tokens 16384   (prints one JSON line; run by moe_layer.py)

Forward and forward+backward (gradients of all weights and of the input), median of 10 after
3 warm-ups, same widths as our layer (D=4096, F=14336, 8 experts, top-2).
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    import torch
    import transformers
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    cfg = MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).to("cuda", torch.bfloat16)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    x = torch.randn(1, args.tokens, 4096, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            out = block(x)
        return out

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        out = block(xg)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        return out

    def median_ms(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[len(times) // 2]

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "experts_implementation": str(getattr(cfg, "_experts_implementation", None)),
                "tokens": args.tokens,
                "forward_ms": median_ms(forward),
                "forward_backward_ms": median_ms(forward_backward),
            }
        )
    )


if __name__ == "__main__":
    main()
