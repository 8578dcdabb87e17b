"""The training run: data and tokenizer, model and optimizer, the loop, checkpoints, logs.

`run(cfg)` trains to `cfg.train.steps`, resuming from the newest verified checkpoint of the run
directory when there is one, so restarting the same command after a crash (or kill -9) picks up
where the last complete checkpoint left off and ends bit-identical to an uninterrupted run.
SIGTERM / SIGINT save a checkpoint and exit cleanly. At the end the trained weights are written
as a model checkpoint (`<run dir>/model`) that `infer.py` loads.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mixtral_jax import checkpoint, data, losses, metrics
from mixtral_jax.config import ConfigError
from mixtral_jax.model import get_params, init
from mixtral_jax.runconfig import RunConfig, to_dict
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path, train_tokenizer
from mixtral_jax.train_checkpoint import TrainCheckpointer
from mixtral_jax.train_step import (TrainState, init_state, make_eval_step, make_optimizer,
                                    make_train_step, split_micro_batches)

TOKENIZER_FILE = "tokenizer.model"
MODEL_DIR = "model"


class NumericsHalt(RuntimeError):
    """Too many consecutive non-finite steps: the run stops without saving."""


def prepare_tokenizer(cfg: RunConfig, documents) -> Tokenizer:
    """The run's tokenizer, copied into the run directory (trained on the training documents)."""
    path = os.path.join(cfg.checkpoint.dir, TOKENIZER_FILE)
    if os.path.isfile(path):  # a resumed run keeps its tokenizer
        return Tokenizer.load(path)
    os.makedirs(cfg.checkpoint.dir, exist_ok=True)
    if cfg.data.tokenizer == "train":
        texts = [d for d in documents if isinstance(d, str)]
        if not texts:
            raise ConfigError("data.tokenizer='train' needs text documents, not token arrays")
        paragraphs = [p for t in texts for p in t.split("\n\n")]
        return train_tokenizer(paragraphs, path, cfg.data.vocab_size)
    source = default_tokenizer_path() if cfg.data.tokenizer == "mistral" else cfg.data.tokenizer
    tokenizer = Tokenizer.load(source)
    shutil.copyfile(source, path)
    return tokenizer


def model_config_for(cfg: RunConfig, tokenizer: Tokenizer):
    """The model config, its vocabulary fitted to a tokenizer trained for this run."""
    model_cfg = cfg.model
    if cfg.data.tokenizer == "train":
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={model_cfg.vocab_size}")
    return model_cfg


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def run(cfg: RunConfig, *, show_progress: bool = True) -> dict:
    """Trains; returns the final metrics (train loss, eval loss and perplexity, unigram entropy)."""
    tc = cfg.train
    stop = _StopFlag()  # from the start: a signal during set-up is honoured after one step
    try:
        return _run(cfg, stop, show_progress)
    finally:
        stop.restore()


def _prepare_data(cfg: RunConfig):
    """(model config, train rows, train batches, held-out batches); the tokenizer is prepared
    (trained or copied) into the run directory on the way."""
    tc = cfg.train
    documents = data.read_documents(cfg.data.source)
    train_docs, eval_docs = data.split_documents(documents, cfg.data.eval_fraction, cfg.seed)
    tokenizer = prepare_tokenizer(cfg, train_docs)
    model_cfg = model_config_for(cfg, tokenizer)
    if tc.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len="
                          f"{model_cfg.max_seq_len}")
    train_rows = data.pack(data.tokenize_documents(train_docs, tokenizer), tc.seq_len, cfg.seed)
    batches = data.BatchIterator(train_rows, tc.batch_size, cfg.seed)
    held_out = []
    if eval_docs:
        eval_rows = data.pack(data.tokenize_documents(eval_docs, tokenizer), tc.seq_len, cfg.seed)
        held_out = data.eval_batches(eval_rows, tc.batch_size, tc.eval_batches)
    return model_cfg, train_rows, batches, held_out


def _init_or_resume(cfg: RunConfig, model_cfg, batches: data.BatchIterator):
    """(graphdef, optimizer, state, checkpointer): fresh, or restored from the newest verified
    checkpoint of the run directory (the data iterator is moved to where that run was)."""
    model = init(model_cfg, cfg.seed)
    graphdef = nnx.graphdef(model)
    tx = make_optimizer(cfg.train, get_params(model))
    state = init_state(get_params(model), tx, cfg.seed)
    del model
    ckpt = TrainCheckpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    if ckpt.steps():
        step = ckpt.steps()[-1]
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      dataclasses.asdict(state))
        restored, meta = ckpt.restore(step, abstract_state)
        state = TrainState(**restored)
        batches.restore(meta["data"])
        print(f"resumed from step {step} of {cfg.checkpoint.dir}")
    return graphdef, tx, state, ckpt


class _Logger:
    """Turns step metrics into tokens/s and MFU, and writes them to the bar, JSONL and TensorBoard."""

    def __init__(self, cfg: RunConfig, model_cfg, start_step: int, show_progress: bool):
        self.writer = metrics.MetricsWriter(cfg.checkpoint.dir,
                                            enabled=jax.process_index() == 0)
        self.peak = cfg.train.peak_tflops or metrics.device_peak_tflops()
        self.flops = metrics.flops_per_token(model_cfg, cfg.train.seq_len)
        self.bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not show_progress,
                        unit="step", dynamic_ncols=True)
        self.last_time, self.tokens = time.perf_counter(), 0.0

    def step(self, step: int, m: dict) -> dict:
        """Logs step `step`; returns its scalars."""
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.last_time, 1e-9)
        self.last_time, self.tokens = now, 0.0
        scalars = {k: float(m[k]) for k in ("loss", "ce", "load_balance_loss", "router_z_loss",
                                            "grad_norm", "lr")}
        scalars["tokens_per_s"] = tok_s
        if self.peak:
            scalars["mfu"] = tok_s * self.flops / (self.peak * 1e12 * jax.device_count())
        self.writer.write(step, scalars, {k: m[k] for k in (
            "tokens_per_expert", "routing_entropy", "dropped_fraction")})
        self.bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                             mfu=f"{scalars['mfu']:.1%}" if self.peak else "n/a")
        return scalars

    def close(self):
        self.bar.close()
        self.writer.close()


def _run(cfg: RunConfig, stop: _StopFlag, show_progress: bool) -> dict:
    tc = cfg.train
    model_cfg, train_rows, batches, held_out = _prepare_data(cfg)
    graphdef, tx, state, ckpt = _init_or_resume(cfg, model_cfg, batches)
    train_step = make_train_step(graphdef, tx, tc)
    eval_step = make_eval_step(graphdef)
    log = _Logger(cfg, model_cfg, int(state.step), show_progress)
    final: dict = {}
    try:
        while int(state.step) < tc.steps:
            batch = split_micro_batches(next(batches), tc.grad_accum)
            state, m = train_step(state, jax.tree.map(jnp.asarray, batch))
            step = int(state.step)
            log.tokens += float(m["tokens"])
            if int(state.bad_steps) >= tc.max_bad_steps:
                raise NumericsHalt(f"{int(state.bad_steps)} consecutive non-finite steps at step "
                                   f"{step} (train.max_bad_steps={tc.max_bad_steps}): halted, "
                                   "nothing saved")
            if step % tc.log_every == 0 or step == tc.steps:
                final.update(log.step(step, m))
            if held_out and (step % tc.eval_every == 0 or step == tc.steps):
                final.update(evaluate(eval_step, state.params, held_out))
                log.writer.write(step, {k: final[k] for k in ("eval_loss", "eval_perplexity")})
            log.bar.update(step - log.bar.n)
            if step % cfg.checkpoint.save_every == 0 or step == tc.steps or stop.signal:
                ckpt.save(step, dataclasses.asdict(state),
                          {"data": batches.state, "config": to_dict(cfg)})
            if stop.signal:
                print(f"\n{stop.signal}: saved step {step}, exiting")
                break
    except BaseException:
        ckpt.close_after_error()
        raise
    else:
        ckpt.close()
    finally:
        log.close()
    if int(state.step) >= tc.steps:
        write_model(cfg.checkpoint.dir, state.params, model_cfg)
    final["step"] = int(state.step)
    final["unigram_entropy"] = losses.unigram_entropy(train_rows.tokens[:, 1:],
                                                       train_rows.segments[:, 1:] > 0)
    return final


def evaluate(eval_step, params, batches: list[dict]) -> dict:
    """Held-out mean loss and perplexity over fixed batches."""
    nll, count = 0.0, 0.0
    for batch in batches:
        b_nll, b_count = eval_step(params, jax.tree.map(jnp.asarray, batch))
        nll, count = nll + float(b_nll), count + float(b_count)
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def write_model(run_dir: str, params, model_cfg) -> str:
    """Writes the final weights as a model checkpoint at `<run_dir>/model` (replacing one)."""
    target = os.path.join(run_dir, MODEL_DIR)
    staging = target + ".new"
    shutil.rmtree(staging, ignore_errors=True)
    checkpoint.save_model(staging, jax.device_get(params), model_cfg,
                          os.path.join(run_dir, TOKENIZER_FILE))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


