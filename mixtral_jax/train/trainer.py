"""The training run: data and tokenizer, model and optimizer, the loop, checkpoints, logs.

`run(cfg)` trains to `cfg.train.steps`, resuming from the newest verified checkpoint of the run
directory when there is one, so restarting the same command after a crash (or kill -9) picks up
where the last complete checkpoint left off and ends bit-identical to an uninterrupted run.
SIGTERM / SIGINT save a checkpoint and exit cleanly. At the end the trained weights are written
as a model checkpoint (`<run dir>/model`) that `infer.py` loads; rerunning a finished run is a
no-op that says so (writing the model if a kill took it). A resume whose config changed in a way
that changes the result is refused (`config.check_resume`). Nothing non-finite is saved: the
step skips non-finite updates, and every save and the final model write check it again.
Library logs (Orbax, absl) and warnings go to `<run dir>/train.log`, not the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import save_adapters
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.config import ConfigError
from mixtral_jax.data import shards
from mixtral_jax.fileio import atomic_write_text
from mixtral_jax.hf.config import load_hf_config
from mixtral_jax.model.params import init_params
from mixtral_jax.parallel import distributed, sharding
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path, train_tokenizer
from mixtral_jax.train import data, metrics, trainable
from mixtral_jax.train.config import RunConfig, check_resume, to_dict
from mixtral_jax.train.step import (
    TrainState,
    all_finite,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    split_micro_batches,
    state_shardings,
)

TOKENIZER_FILE = "tokenizer.model"
MODEL_DIR = "model"
MODEL_STEP_FILE = "model_step.json"  # {"step": N}: the step the final model was written at
LOG_FILE = "train.log"


class NumericsHalt(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights about to be saved: the run
    stops without saving them."""


def base_model_config(cfg: RunConfig):
    """The run's model config: the [model] table, or the starting checkpoint's architecture
    computed as this run's [model] table says (`ComputeConfig`). A quantized one (the [model]
    table's expert_bits / attention_bits, or a checkpoint written by `python -m
    mixtral_jax.quantize`) trains LoRA adapters over its frozen codes only (QLoRA)."""
    if not cfg.checkpoint.init_from:
        trainable.check_quantized(cfg.train, cfg.model, "the [model] table")
        return cfg.model
    start = load_hf_config(cfg.checkpoint.init_from)
    where = f"checkpoint.init_from={cfg.checkpoint.init_from}"
    trainable.check_quantized(cfg.train, start, where)
    return start.replace(compute=cfg.model.compute)


def tokenizer_choice(cfg: RunConfig, model_cfg) -> str:
    """`train`, or the path of the tokenizer file the run uses (resolving `auto`, `mistral`)."""
    choice = cfg.data.tokenizer
    beside_start = os.path.join(cfg.checkpoint.init_from, TOKENIZER_FILE)
    if choice == "auto":
        if cfg.checkpoint.init_from and os.path.isfile(beside_start):
            return beside_start
        choice = "mistral" if model_cfg.vocab_size in (32000, 32768) else "train"
    if choice == "train" and cfg.checkpoint.init_from:
        raise ConfigError(
            "data.tokenizer='train' cannot go with checkpoint.init_from: the "
            "starting weights need their own tokenizer (give its file)"
        )
    if choice == "mistral":
        return default_tokenizer_path(model_cfg.vocab_size)
    return choice


def prepare_tokenizer(
    cfg: RunConfig, model_cfg, documents, choice: str | None = None
) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained_here), the tokenizer copied into the run directory (`choice`: the
    file to copy, default `tokenizer_choice`)."""
    path = os.path.join(cfg.checkpoint.dir, TOKENIZER_FILE)
    choice = choice or tokenizer_choice(cfg, model_cfg)
    if jax.process_count() > 1:  # process 0 makes it, once; every process waits for it
        if distributed.is_main() and not os.path.isfile(path):
            _make_tokenizer(cfg, choice, documents, path)
        # unconditional: a process that found the file process 0 had just written would skip
        # a conditional barrier and leave process 0 waiting in it
        distributed.barrier("tokenizer")
    if os.path.isfile(path):  # a resumed run keeps its tokenizer
        return Tokenizer.load(path), choice == "train"
    return _make_tokenizer(cfg, choice, documents, path), choice == "train"


def _make_tokenizer(cfg: RunConfig, choice: str, documents, path: str) -> Tokenizer:
    """Trains the tokenizer into `path`, or copies the chosen file there."""
    os.makedirs(cfg.checkpoint.dir, exist_ok=True)
    if choice == "train":
        texts = [d for d in documents if isinstance(d, str)]
        if not texts:
            raise ConfigError("data.tokenizer='train' needs text documents, not token arrays")
        paragraphs = [p for t in texts for p in t.split("\n\n")]
        return train_tokenizer(paragraphs, path, cfg.data.vocab_size)
    tokenizer = Tokenizer.load(choice)
    shutil.copyfile(choice, path)
    return tokenizer


def model_config_for(model_cfg, tokenizer: Tokenizer, trained_here: bool):
    """The model config, its vocabulary fitted to a tokenizer trained for this run."""
    if trained_here:
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size={model_cfg.vocab_size}"
        )
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
    """Trains; returns the final metrics (train loss, eval loss and perplexity, unigram entropy),
    or {"step", "complete": True, "model_written"} when the run had already finished."""
    stop = _StopFlag()  # from the start: a signal during set-up is honoured after one step
    try:
        with library_logs_to(os.path.join(cfg.checkpoint.dir, LOG_FILE)):
            try:
                return _run(cfg, stop, show_progress)
            except ConfigError:
                raise  # one line by design; a bad setting should not create a run directory
            except BaseException:
                logging.getLogger(__name__).exception("the run stopped with an error")
                raise
    finally:
        stop.restore()


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates the file (and its directory) at the first record only."""

    def __init__(self, path: str):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


class _LogStream(io.TextIOBase):
    """A text stream that appends to a `_LazyFileHandler`'s file (stands in for sys.stderr)."""

    def __init__(self, handler: _LazyFileHandler):
        self.handler = handler

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.handler.stream is None:
            self.handler.stream = self.handler._open()
        return self.handler.stream.write(text)

    def flush(self) -> None:
        if self.handler.stream is not None:
            self.handler.stream.flush()


_terminal = [sys.stderr]  # where progress and errors go while sys.stderr points at the log


def terminal() -> io.TextIOBase:
    """The terminal's stderr, also while `library_logs_to` sends sys.stderr to the log."""
    return _terminal[-1]


def keep_library_logs_in(path: str) -> logging.Handler:
    """Sends Python logging to the file `path` (and not the terminal) until the process ends:
    what libraries log while they shut down (asyncio futures of a failed save) goes there."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    for h in list(root.handlers):
        if h is absl_logging.get_absl_handler() or (
            type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
        ):
            root.removeHandler(h)
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


@contextlib.contextmanager
def library_logs_to(path: str):
    """Sends Python logging (Orbax and absl log through it), warnings, uncaught thread errors and
    what native code prints to sys.stderr (TensorStore's tracebacks after a failed write) to the
    file `path` instead of the terminal, for the duration of the block; the progress bar and
    train.py's messages use `terminal()`."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = [
        h
        for h in root.handlers
        if h is absl_logging.get_absl_handler()
        or (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout))
    ]
    old_level, old_hook, old_stderr = root.level, threading.excepthook, sys.stderr
    for h in to_terminal:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    logging.captureWarnings(True)

    def thread_error(args):
        exc = (args.exc_type, args.exc_value, args.exc_traceback)
        logging.getLogger(__name__).error("error in thread %s", args.thread, exc_info=exc)

    threading.excepthook = thread_error
    _terminal.append(old_stderr)
    sys.stderr = _LogStream(handler)
    try:
        yield
    finally:
        sys.stderr = old_stderr
        _terminal.pop()
        threading.excepthook = old_hook
        logging.captureWarnings(False)
        root.setLevel(old_level)
        root.removeHandler(handler)
        handler.close()
        for h in to_terminal:
            root.addHandler(h)


def _prepare_data(cfg: RunConfig):
    """(model config, documents, train batches, held-out batches); the tokenizer is prepared
    (trained or copied) into the run directory on the way. A prepared shard directory is read
    memory-mapped, anything else into memory; both go through the same split and packing."""
    tc = cfg.train
    model_cfg = base_model_config(cfg)
    if shards.is_prepared(cfg.data.source):
        documents = shards.ShardSet(cfg.data.source)
        tokenizer, trained_here = prepare_tokenizer(cfg, model_cfg, [], _shard_tokenizer(cfg))
        model_cfg = model_config_for(model_cfg, tokenizer, trained_here)
        documents.check_ids(model_cfg.vocab_size)
    else:
        texts = [d for d in data.read_documents(cfg.data.source) if _has_text(d)]
        tokenizer_docs, _ = data.split_documents(texts, cfg.data.eval_fraction, cfg.seed)
        tokenizer, trained_here = prepare_tokenizer(cfg, model_cfg, tokenizer_docs)
        model_cfg = model_config_for(model_cfg, tokenizer, trained_here)
        tokens = data.tokenize_documents(texts, tokenizer)
        data.check_token_ids(tokens, model_cfg.vocab_size, cfg.data.source)
        documents = data.Documents(tokens)
    if tc.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    split = data.Split(documents.num_docs, cfg.data.eval_fraction, cfg.seed)
    batches = data.BatchIterator(documents, split, tc.batch_size, tc.seq_len, cfg.seed)
    held_out = data.eval_batches(documents, split, tc.batch_size, tc.seq_len, tc.eval_batches)
    return model_cfg, documents, batches, held_out


def _has_text(doc) -> bool:
    """A token array, or a text that is not blank (a blank one has no tokens: dropped before
    the split, so text documents and their token arrays are numbered alike)."""
    return isinstance(doc, np.ndarray) or bool(doc.strip())


def _shard_tokenizer(cfg: RunConfig) -> str:
    """The tokenizer file of a prepared source; ConfigError when data.tokenizer (or the starting
    checkpoint's tokenizer) is another."""
    choice = cfg.data.tokenizer
    if choice == "mistral":
        choice = default_tokenizer_path(32000)
    setting = f"data.tokenizer={cfg.data.tokenizer}"
    beside_start = os.path.join(cfg.checkpoint.init_from, TOKENIZER_FILE)
    if choice == "auto" and cfg.checkpoint.init_from and os.path.isfile(beside_start):
        choice = beside_start  # the starting weights' tokenizer must be the shards' too
        setting = f"the tokenizer of checkpoint.init_from ({beside_start})"
    return shards.prepared_tokenizer(cfg.data.source, choice, setting)


def make_run_mesh(cfg: RunConfig) -> jax.sharding.Mesh:
    """The run's device mesh over the first data*fsdp*expert*tensor devices (every device when
    one axis is -1); the all-1 default is a 1x1x1x1 mesh over the first device."""
    m = cfg.mesh
    devices = jax.devices()
    if -1 not in (m.data, m.fsdp, m.expert, m.tensor):
        wanted = math.prod((m.data, m.fsdp, m.expert, m.tensor))
        if wanted > len(devices):
            raise ConfigError(
                f"mesh {m.data}x{m.fsdp}x{m.expert}x{m.tensor} (data x fsdp x "
                f"expert x tensor) needs {wanted} devices, {len(devices)} present"
            )
        devices = devices[:wanted]
    processes = {d.process_index for d in devices}
    if len(processes) < jax.process_count():
        raise ConfigError(
            f"mesh {m.data}x{m.fsdp}x{m.expert}x{m.tensor} (data x fsdp x expert x "
            f"tensor) spans {len(processes)} of the run's {jax.process_count()} "
            "processes: give it every device (e.g. mesh.data=-1)"
        )
    try:
        return sharding.make_mesh(m, devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None


def _check_mesh_fits(cfg: RunConfig, model_cfg, mesh) -> None:
    """ConfigError unless the micro-batch rows and the experts split evenly over the mesh."""
    parts = int(np.prod([mesh.shape[a] for a in sharding.LOGICAL_RULES["batch"]]))
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % parts:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / grad_accum="
            f"{cfg.train.grad_accum} = {micro} rows per micro-batch cannot be split "
            f"over the mesh's {parts} data-holding devices (data x fsdp x expert)"
        )
    if model_cfg.num_experts % mesh.shape["expert"]:
        raise ConfigError(
            f"mesh.expert={mesh.shape['expert']} does not divide "
            f"num_experts={model_cfg.num_experts}"
        )


def _on_mesh(batch: dict, mesh, leading: int, global_rows: int | None = None) -> dict:
    """Host batch -> device arrays, rows (axis `leading`) split over the mesh. The batch holds
    every row (global_rows None: this process keeps its devices' rows), or only this process's
    rows (`process_rows` order) of a batch of `global_rows` rows."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        where = sharding.batch_sharding(mesh, v.ndim, leading)
        if global_rows is None:
            shape = v.shape
            v = np.take(v, distributed.process_rows(where, shape, leading), axis=leading)
        else:
            shape = (*v.shape[:leading], global_rows, *v.shape[leading + 1 :])
        out[k] = distributed.global_batch(v, where, shape)
    return out


def _load_local_rows(cfg: RunConfig, mesh, batches: data.BatchIterator) -> int:
    """Makes `batches` load only this process's rows of each batch (all of them with one
    process) and returns the micro-batch row count to pass to `_on_mesh`."""
    tc = cfg.train
    rows = tc.batch_size // tc.grad_accum  # per micro-batch, split over the mesh
    shape = (tc.grad_accum, rows, tc.seq_len)
    mine = distributed.process_rows(sharding.batch_sharding(mesh, 3, leading=1), shape, 1)
    # split_micro_batches cuts the flat batch into consecutive micro-batches of `rows` rows
    batches.select(np.concatenate([g * rows + mine for g in range(tc.grad_accum)]))
    return rows


def _init_or_resume(cfg: RunConfig, model_cfg, batches: data.BatchIterator, mesh):
    """(graphdef, optimizer, state, checkpointer): fresh, or restored from the newest verified
    checkpoint of the run directory (the data iterator is moved to where that run was).
    Parameters and optimizer state are created (or restored) sharded on `mesh` by the rules table.

    No weights are made before they are needed: a resumed run restores into abstract shapes, a
    fine-tuning run loads its start weights, and only a fresh run draws random ones (making and
    discarding them first would double the start-up memory: 187 GB for 8x7B in float32)."""
    part = trainable.partition(cfg.train, model_cfg)  # None: everything trains
    graphdef = nnx.graphdef(trainable.abstract_model(model_cfg, part))
    shapes = jax.eval_shape(lambda: init_params(model_cfg, mesh, cfg.seed))  # nothing drawn
    shapes = _placed(shapes, sharding.param_shardings(shapes, mesh))
    if part is not None:  # the state holds only what trains
        shapes = trainable.train_shapes(part, shapes, model_cfg, cfg.seed, mesh)
    tx = make_optimizer(cfg.train, shapes)
    ckpt = TrainCheckpointer(
        cfg.checkpoint.dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    if ckpt.steps():  # the newest step's config, before shapes that may not fit
        check_resume(_saved_config(ckpt, ckpt.steps()[-1]), cfg, ckpt.steps()[-1])
    # restored straight into the shardings a fresh state would have, newest verified step first
    abstract_state = _placed(
        jax.eval_shape(lambda p: dataclasses.asdict(init_state(p, tx, 0)), shapes),
        dataclasses.asdict(state_shardings(shapes, tx, mesh)),
    )
    latest = ckpt.restore_latest(abstract_state)
    if latest is not None:
        step, restored, meta = latest
        check_resume(meta.get("config"), cfg, step)  # the step restored (an older one: checked)
        if part is not None:
            trainable.check_same_base(meta.get("config"), cfg, step)
        batches.restore(meta["data"])
        print(f"resumed from step {step} of {cfg.checkpoint.dir}")
        frozen = None if part is None else (part, _start_params(cfg, model_cfg, mesh, part))
        return graphdef, tx, TrainState(**restored), ckpt, frozen
    params, frozen = _start_params(cfg, model_cfg, mesh, part), None
    if part is not None:  # the frozen rest is the start, again on resume (never saved)
        frozen = (part, params)
        params = trainable.place_train_part(part, params, model_cfg, cfg.seed, mesh)
    return graphdef, tx, _fresh_state(params, tx, cfg.seed, mesh), ckpt, frozen


def _start_params(cfg: RunConfig, model_cfg, mesh, part):
    """The weights a fresh run starts from (`checkpoint.init_from`, or drawn from the seed),
    placed on `mesh`; a LoRA run keeps a checkpoint's base in its stored dtype."""
    if not cfg.checkpoint.init_from:
        return init_params(model_cfg, mesh, cfg.seed)
    keep_dtype = part is not None and part.lcfg is not None
    dtype = None if keep_dtype else model_cfg.compute.param_dtype
    _, params = checkpoint.load_model(cfg.checkpoint.init_from, param_dtype=dtype)
    print(f"starting from the weights of {cfg.checkpoint.init_from}")
    return sharding.shard_params(params, mesh)


def _saved_config(ckpt: TrainCheckpointer, step: int) -> dict | None:
    """The run config saved with checkpoint `step` (None when it has none or cannot be read:
    the verified restore that follows reports a damaged checkpoint)."""
    try:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return ckpt.manager.restore(step, args=args)["meta"].get("config")
    except Exception:  # noqa: BLE001
        return None


def _placed(shapes, shardings):
    """`shapes` (a tree of ShapeDtypeStructs) carrying the matching tree of `shardings`."""
    return jax.tree.map(
        lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), shapes, shardings
    )


def _fresh_state(params, tx, seed: int, mesh) -> TrainState:
    """init_state, created in its `state_shardings` on `mesh`."""
    return jax.jit(
        lambda p: init_state(p, tx, seed), out_shardings=state_shardings(params, tx, mesh)
    )(params)


class _Logger:
    """Turns step metrics into tokens/s and MFU, and writes them to the bar, JSONL and TensorBoard."""

    def __init__(self, cfg: RunConfig, model_cfg, start_step: int, show_progress: bool):
        self.writer = metrics.MetricsWriter(cfg.checkpoint.dir, enabled=jax.process_index() == 0)
        self.peak = cfg.train.peak_tflops or metrics.device_peak_tflops()
        self.flops = metrics.flops_per_token(model_cfg, cfg.train.seq_len)
        self.bar = tqdm(
            total=cfg.train.steps,
            initial=start_step,
            unit="step",
            disable=not (show_progress and distributed.is_main()),
            dynamic_ncols=True,
            file=terminal(),
        )
        self.last_time, self.tokens = time.perf_counter(), 0.0

    def step(self, step: int, m: dict) -> dict:
        """Logs step `step`; returns its scalars."""
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.last_time, 1e-9)
        self.last_time, self.tokens = now, 0.0
        scalars = {
            k: float(m[k])
            for k in ("loss", "ce", "load_balance_loss", "router_z_loss", "grad_norm", "lr")
        }
        scalars["tokens_per_s"] = tok_s
        if self.peak:
            scalars["mfu"] = tok_s * self.flops / (self.peak * 1e12 * jax.device_count())
        self.writer.write(
            step,
            scalars,
            {k: m[k] for k in ("tokens_per_expert", "routing_entropy", "dropped_fraction")},
        )
        self.bar.set_postfix(
            loss=f"{scalars['loss']:.3f}",
            tok_s=f"{tok_s:,.0f}",
            mfu=f"{scalars['mfu']:.1%}" if self.peak else "n/a",
        )
        return scalars

    def close(self):
        self.bar.close()
        self.writer.close()


def _run(cfg: RunConfig, stop: _StopFlag, show_progress: bool) -> dict:
    model_cfg, documents, batches, held_out = _prepare_data(cfg)
    mesh = make_run_mesh(cfg)
    _check_mesh_fits(cfg, model_cfg, mesh)
    return _train(cfg, stop, show_progress, model_cfg, documents, batches, held_out, mesh)


def _train(cfg, stop, show_progress, model_cfg, documents, batches, held_out, mesh) -> dict:
    tc = cfg.train
    graphdef, tx, state, ckpt, frozen = _init_or_resume(cfg, model_cfg, batches, mesh)
    if int(state.step) >= tc.steps:
        return _complete(cfg, ckpt, state, model_cfg, mesh, frozen)
    where = state_shardings(state.params, tx, mesh)
    train_step = make_train_step(graphdef, tx, tc, mesh=mesh, shardings=where, frozen=frozen)
    eval_step = make_eval_step(graphdef, mesh=mesh, param_shardings=where.params, frozen=frozen)
    log = _Logger(cfg, model_cfg, int(state.step), show_progress)
    global_rows = _load_local_rows(cfg, mesh, batches)
    batches = data.Prefetch(batches)  # after restore and select: draws from here on
    final: dict = {}
    try:
        ckpt.reserve(dataclasses.asdict(state))  # pinned host memory for the saves' copies
        while int(state.step) < tc.steps:
            batch = split_micro_batches(next(batches), tc.grad_accum)
            state, m = train_step(state, _on_mesh(batch, mesh, 1, global_rows))
            step = int(state.step)
            log.tokens += float(m["tokens"])
            if int(state.bad_steps) >= tc.max_bad_steps:
                raise NumericsHalt(
                    f"{int(state.bad_steps)} consecutive non-finite steps at step "
                    f"{step} (train.max_bad_steps={tc.max_bad_steps}): halted, "
                    f"{_saved_note(ckpt)}"
                )
            if step % tc.log_every == 0 or step == tc.steps:
                final.update(log.step(step, m))
            if held_out and (step % tc.eval_every == 0 or step == tc.steps):
                final.update(evaluate(eval_step, state.params, held_out, mesh))
                log.writer.write(step, {k: final[k] for k in ("eval_loss", "eval_perplexity")})
            log.bar.update(step - log.bar.n)
            if step % cfg.checkpoint.save_every == 0 or step == tc.steps or stop.signal:
                _check_finite(state, f"the training state of step {step}", mesh, ckpt)
                ckpt.save(
                    step, dataclasses.asdict(state), {"data": batches.state, "config": to_dict(cfg)}
                )
            if stop.signal:
                print(f"\n{stop.signal}: saved step {step}, exiting")
                break
    except BaseException:
        ckpt.close_after_error()
        raise
    else:
        ckpt.close()
    finally:
        batches.close()
        log.close()
    if int(state.step) >= tc.steps:
        write_final(cfg, state.params, model_cfg, int(state.step), mesh, frozen)
    final["step"] = int(state.step)
    final["unigram_entropy"] = data.unigram_entropy(documents.unigram_counts())
    return final


def _complete(cfg: RunConfig, ckpt: TrainCheckpointer, state, model_cfg, mesh, frozen) -> dict:
    """A run whose newest checkpoint already reached train.steps: nothing to train. The final
    model is written only when it is missing or not of this step (a kill during its write);
    returns {"step", "complete": True, "model_written"}."""
    ckpt.close()
    step = int(state.step)
    written = model_step(cfg.checkpoint.dir) != step
    if written:
        write_final(cfg, state.params, model_cfg, step, mesh, frozen)
    return {"step": step, "complete": True, "model_written": written}


def _saved_note(ckpt: TrainCheckpointer) -> str:
    """What a halted run leaves on disk: its finished checkpoints (pending saves waited for)."""
    try:
        ckpt.wait()
    except RuntimeError:  # a failed save holds nothing; the finished ones are listed below
        pass
    steps = ckpt.steps()
    if not steps:
        return "nothing saved"
    listed = ", ".join(map(str, steps))
    return f"saved checkpoints (finite): step{'s' * (len(steps) > 1)} {listed}; a restart resumes from step {steps[-1]}"


def _check_finite(tree, what: str, mesh, ckpt: TrainCheckpointer | None = None) -> None:
    """NumericsHalt if a floating-point leaf of `tree` holds inf or NaN (a run resumed from a
    checkpoint written before the guard checked updates): never saved."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if not bool(jax.jit(all_finite, out_shardings=replicated)(tree)):
        note = _saved_note(ckpt) if ckpt is not None else "nothing written"
        raise NumericsHalt(f"{what} is not finite: not saved; {note}")


def model_step(run_dir: str) -> int | None:
    """The step the run's final model was written at (None: no final model, or one whose write
    was cut short: the marker is written after the model is in place)."""
    path = os.path.join(run_dir, MODEL_STEP_FILE)
    if not os.path.isdir(os.path.join(run_dir, MODEL_DIR)) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict:
    """Held-out mean loss and perplexity over fixed [B, T] batches, rows split over `mesh`."""
    nll, count = 0.0, 0.0
    for batch in batches:
        b_nll, b_count = eval_step(params, _on_mesh(batch, mesh, leading=0))
        nll, count = nll + float(b_nll), count + float(b_count)
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def write_final(cfg: RunConfig, params, model_cfg, step: int, mesh, frozen) -> str:
    """The run's final model at `<run dir>/model`: the whole model, or, for a LoRA run, the
    adapters alone (an adapter directory: `checkpoint/adapters.py`)."""
    run_dir = cfg.checkpoint.dir
    if frozen is None:
        return write_model(run_dir, params, model_cfg, step, mesh)
    part, fixed = frozen
    if part.lcfg is None:  # selected parts trained: the whole model, joined
        return write_model(run_dir, part.join(params, fixed), model_cfg, step, mesh)
    _check_finite(params, f"the final adapters of step {step}", mesh)
    target = os.path.join(run_dir, MODEL_DIR)
    host = jax.tree.map(distributed.host_array, params)
    if distributed.is_main():
        base = os.path.abspath(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else ""
        save_adapters(target, host, part.lcfg, base=base, overwrite=True)
        atomic_write_text(os.path.join(run_dir, MODEL_STEP_FILE), json.dumps({"step": step}))
    distributed.barrier("final adapters")
    return target


def write_model(run_dir: str, params, model_cfg, step: int, mesh) -> str:
    """Writes the final weights of `step` as a model checkpoint at `<run_dir>/model` (replacing
    one), then records the step in `<run_dir>/model_step.json`. Non-finite weights are refused
    (NumericsHalt) and nothing is written."""
    _check_finite(params, f"the final model of step {step}", mesh)
    target = os.path.join(run_dir, MODEL_DIR)
    host = jax.tree.map(distributed.host_array, params)  # every process takes part
    if distributed.is_main():  # one writer
        checkpoint.save_model(
            target,
            host,
            model_cfg,
            os.path.join(run_dir, TOKENIZER_FILE),
            this_process_only=True,
            overwrite=True,
        )
        atomic_write_text(os.path.join(run_dir, MODEL_STEP_FILE), json.dumps({"step": step}))
    distributed.barrier("final model")
    return target
