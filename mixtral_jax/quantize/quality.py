"""What quantization costs: held-out perplexity of the original and the quantized model side by
side, the largest logit error and the share of tokens whose top-1 prediction changes.

The held-out text is the training run's split by default (`train/data.py`): the documents of
the data source that `Split(eval_fraction, seed)` holds out (train.py's defaults: 5%, seed 0),
tokenized with the original checkpoint's tokenizer and packed into rows of seq_len + 1 tokens
as train.py's eval batches are. Counted tokens are those whose next token is in the same document (the loss mask).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.model.params import from_params
from mixtral_jax.tokenizer import Tokenizer
from mixtral_jax.train import data, losses


@dataclasses.dataclass(frozen=True)
class Quality:
    """Attributes:
    original_loss, quantized_loss: mean next-token NLL (nats) over the counted tokens.
    max_logit_error: max |logit_q - logit_o| over counted tokens and the vocabulary.
    top1_changed: share of counted tokens whose argmax differs.
    tokens: counted tokens.
    """

    original_loss: float
    quantized_loss: float
    max_logit_error: float
    top1_changed: float
    tokens: int

    @property
    def perplexity_increase(self) -> float:
        """exp(quantized loss) / exp(original loss) - 1."""
        return float(np.expm1(self.quantized_loss - self.original_loss))

    def lines(self, original: str, quantized: str) -> list[str]:
        rows = [(original, self.original_loss), (quantized, self.quantized_loss)]
        out = [f"{'checkpoint':<44} {'loss':>8} {'perplexity':>10}"]
        out += [f"{p:<44} {loss:>8.4f} {np.exp(loss):>10.3f}" for p, loss in rows]
        out.append(
            f"perplexity {100 * self.perplexity_increase:+.3f}%, max logit error "
            f"{self.max_logit_error:.4g}, top-1 changed on {100 * self.top1_changed:.3f}% of "
            f"{self.tokens:,} held-out tokens"
        )
        return out


def held_out_batches(
    source: str,
    tokenizer: Tokenizer,
    *,
    eval_fraction: float = 0.05,
    seed: int = 0,
    seq_len: int = 128,
    batch_size: int = 16,
    max_batches: int = 8,
) -> list[dict]:
    """Held-out batches of `source` as train.py makes them (see the module doc); with
    eval_fraction 0 the whole source is held-out text."""
    texts = [d for d in data.read_documents(source) if not isinstance(d, str) or d.strip()]
    if eval_fraction and all(isinstance(t, str) for t in texts):
        documents = _held_out_only(texts, tokenizer, eval_fraction, seed)
    else:
        documents = data.Documents(data.tokenize_documents(texts, tokenizer))
    if eval_fraction:  # the trainer's held-out split and eval batches
        split = data.Split(documents.num_docs, eval_fraction, seed)
        batches = data.eval_batches(documents, split, batch_size, seq_len, max_batches)
    else:  # every document, packed in the seeded order
        rows = data.pack(documents.docs, seq_len, seed)
        size = min(batch_size, rows.num_rows)
        count = min(max_batches, rows.num_rows // max(size, 1))
        batches = [data.make_batch(rows, np.arange(i * size, (i + 1) * size)) for i in range(count)]
    if not batches:
        raise ConfigError(f"{source}: no held-out rows of {seq_len + 1} tokens")
    return batches


def _held_out_only(texts: list[str], tokenizer: Tokenizer, eval_fraction: float, seed: int):
    """`Documents` of `texts` with only the held-out ones tokenized (the others empty, never
    read by `eval_batches`). Each non-blank text is one document (BOS + tokens + EOS), so the
    split over the texts is the trainer's over its token documents; tokenizing 1/20 of the
    source instead of all of it is what makes `quantize eval` on a large source quick."""
    held = set(data.Split(len(texts), eval_fraction, seed).held().tolist())
    empty = np.zeros(0, np.int32)
    return data.Documents(
        [
            data.tokenize_documents([text], tokenizer)[0] if i in held else empty
            for i, text in enumerate(texts)
        ]
    )


def compare(original: str, quantized: str, batches: list[dict]) -> Quality:
    """Runs both model checkpoints on `batches` (float32 logits) and compares them."""
    fns = [_logits_fn(path) for path in (original, quantized)]
    nll = np.zeros(2)
    count, worst, changed = 0.0, 0.0, 0.0
    for batch in batches:
        args = [jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")]
        targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])
        logits = [fn(*args) for fn in fns]
        for i, lg in enumerate(logits):
            nll[i] += float(losses.cross_entropy(lg, targets, mask)[0])
        counted = mask > 0
        diff = jnp.max(jnp.abs(logits[1] - logits[0]), axis=-1)  # [B, T]
        worst = max(worst, float(jnp.max(jnp.where(counted, diff, 0.0))))
        flips = jnp.argmax(logits[0], axis=-1) != jnp.argmax(logits[1], axis=-1)
        changed += float(jnp.sum(flips & counted))
        count += float(jnp.sum(counted))
    count = max(count, 1.0)
    return Quality(nll[0] / count, nll[1] / count, worst, changed / count, int(count))


def _logits_fn(path: str):
    """The checkpoint's full forward, its weights an argument of the jitted call: captured as
    constants instead, a model of 1 GB compiled for minutes (seen on the H200)."""
    cfg, params = checkpoint.load_model(path)

    @jax.jit
    def logits(params, tokens, positions, segment_ids):
        model = from_params(cfg, params)
        return model(tokens, positions=positions, segment_ids=segment_ids).logits

    return lambda t, p, s: logits(params, t, p, s)


def evaluate(original: str, quantized: str, source: str = "builtin:pydoc", **split) -> Quality:
    """`compare` on the held-out batches of `source` (tokenized with the original's tokenizer;
    `split`: held_out_batches' keyword arguments)."""
    tokenizer_path = os.path.join(original, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"no tokenizer at {tokenizer_path}: the original needs one")
    batches = held_out_batches(source, Tokenizer.load(tokenizer_path), **split)
    return compare(original, quantized, batches)
