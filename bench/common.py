"""Shared benchmark helpers: device ceilings measured in the same run, big random models on device.

Run from the repository root with PYTHONPATH=. (the GPU machine does not install the package).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.paths import out_dir


def timed(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn(*args) (blocking on the result), after warm-up runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(n: int = 8192) -> float:
    """bf16 n^3 matmul throughput through XLA on random data (TFLOP/s)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / timed(f, a, b, repeats=20) / 1e12


def copy_bandwidth_tbs(gib: int = 4) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second, TB/s)."""
    x = jnp.ones((gib * (1 << 30) // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    return 2 * x.nbytes / timed(f, x, repeats=20) / 1e12


def random_model(cfg: mj.ModelConfig, seed: int = 0) -> mj.Mixtral:
    """The model with N(0, 0.02^2)-ish random weights made on the device, one layer slice at a
    time (a full float32 temporary of an 8x7B expert stack would not fit)."""
    leaves, treedef = jax.tree.flatten(mj.param_shapes(cfg))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = []
    for key, leaf in zip(keys, leaves):
        dtype, shape = leaf.dtype, leaf.shape

        @jax.jit
        def make(key, shape=shape, dtype=dtype):
            if len(shape) >= 3:  # stacked [L, ...]: one layer at a time
                return jax.lax.map(
                    lambda k: (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(dtype),
                    jax.random.split(key, shape[0]),
                )
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

        made.append(make(key))
    params = jax.tree.unflatten(treedef, made)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if "scale" in jax.tree_util.keystr(p) else x, params
    )
    return mj.from_params(cfg, params)


EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def loaded_random_model(cfg: mj.ModelConfig, pool: int = 3, seed: int = 0) -> mj.Mixtral:
    """The model placed on the device by the product's loader (`placement.place_params`, as
    infer.py loads a checkpoint: preallocated leaves filled slice by slice, one layer or one
    expert at a time), from readers that hand out random host slices. Each slice shape has
    `pool` distinct random slices, reused cyclically (drawing 93 GB with numpy would take minutes;
    what is measured reads every byte either way). Norm scales are ones."""
    import ml_dtypes  # noqa: F401 - numpy's bfloat16

    from mixtral_jax.checkpoint.placement import LeafReader, default_shardings, place_params

    shapes = mj.param_shapes(cfg)
    rng = np.random.default_rng(seed)
    made: dict = {}

    def slices(shape, dtype, scale):
        key = (shape, str(dtype), scale)
        if key not in made:
            draw = [rng.standard_normal(shape, np.float32) for _ in range(pool)]
            made[key] = [np.ones(shape, dtype) if scale else (0.02 * x).astype(dtype) for x in draw]
        return made[key]

    readers = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(k.key for k in path)
        lead = int(names[0] == "layers") + int(names[-1] in EXPERT_WEIGHTS)
        shape, dtype = tuple(leaf.shape[lead:]), np.dtype(leaf.dtype)
        pieces = slices(shape, dtype, "scale" in names)
        nbytes = int(np.prod(leaf.shape)) * dtype.itemsize
        readers[names] = LeafReader(lead, lambda index, p=pieces: p[sum(index) % len(p)], nbytes)
    params = place_params(shapes, readers, default_shardings(shapes), progress=False)
    return mj.from_params(cfg, params)


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict:
    """One training batch of random tokens, as the train step takes it: [1 micro-batch, B, T]."""
    tokens = np.random.default_rng(seed).integers(3, vocab_size, (1, batch, seq + 1))
    tokens = tokens.astype(np.int32)
    return {
        "tokens": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)),
        "segment_ids": np.ones((1, batch, seq), np.int32),
        "loss_mask": np.ones((1, batch, seq), np.float32),
    }


def time_train_steps(step, state, data, steps: int):
    """Runs 2 warm-up steps, then `steps` timed ones: (state, last metrics, median step seconds,
    warm-up seconds)."""
    start = time.perf_counter()
    for _ in range(2):
        state, m = step(state, data)
    jax.block_until_ready(m["loss"])
    warm = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - start)
    return state, m, float(np.median(times)), warm


def run_peer(args: list[str], timeout: int = 400) -> dict:
    """Runs a PyTorch peer script (`python ARGS`, printing one JSON line last) in a subprocess,
    before JAX touches the GPU; a failing peer gives {"error": ...} rather than hiding our rows."""
    try:
        out = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, check=True, timeout=timeout
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as err:  # noqa: BLE001
        detail = getattr(err, "stderr", None) or str(err)
        return {"error": str(detail)[-500:]}


def environment() -> dict:
    import flax

    return {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }


def write_json(name: str, payload: dict) -> None:
    with open(os.path.join(out_dir(), name), "w") as f:
        json.dump(payload, f, indent=1)


def trace_kernels(fn, reps: int = 10) -> list[tuple[str, int, int]]:
    """Runs fn() `reps` times (after one untraced run) under the JAX profiler and returns the
    GPU kernels it launched as (name, start ns, duration ns): device time without host gaps.
    Finding none, it says on stderr what the trace held (`describe_profile`)."""
    jax.block_until_ready(fn())
    where = tempfile.mkdtemp()
    with jax.profiler.trace(where):
        out = None
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
    paths = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        print(f"trace_kernels: no *.xplane.pb under {where}", file=sys.stderr)
        return []
    profile = jax.profiler.ProfileData.from_file(paths[0])
    kernels = device_kernels(profile)
    if not kernels:
        for line in describe_profile(profile):
            print(f"trace_kernels: {line}", file=sys.stderr)
    return kernels


# Lines of a GPU plane that hold kernels, best first: CUPTI's per-stream lines ("Stream #7",
# "Stream #13(Compute)", "Stream #14(Compute,MemcpyD2H)": a stream that also copies is one line,
# whose copy events are left out; lines of copies alone too), a "Kernels" line, and XLA's
# per-op line ("XLA Ops": one event per thunk, which spans its kernels).
KERNEL_LINES = (
    lambda n: (
        n.startswith("stream") and ("compute" in n or not any(w in n for w in ("memcpy", "memset")))
    ),
    lambda n: n == "kernels" or n.endswith(" kernels"),
    lambda n: n == "xla ops",
)


def is_gpu_plane(name: str) -> bool:
    """The device planes of NVIDIA GPUs: "/device:GPU:0", "/device:GPU:0 (...)", "/device:CUDA:0"."""
    n = name.lower()
    return n.startswith(("/device:gpu", "/device:cuda"))


def device_kernels(profile) -> list[tuple[str, int, int]]:
    """(name, start ns, duration ns) of every kernel on the GPU planes of a ProfileData-like
    object (`.planes`, each with `.name`, `.lines`; a line with `.name`, `.events`; an event
    with `.name`, `.start_ns`, `.duration_ns`), sorted by start. Per plane, the first kind of
    line in KERNEL_LINES that it has (no double counting of derived lines)."""
    kernels = set()
    for plane in profile.planes:
        if not is_gpu_plane(plane.name):
            continue
        lines = list(plane.lines)
        for wanted in KERNEL_LINES:
            chosen = [line for line in lines if wanted(line.name.strip().lower())]
            if chosen:
                break
        for line in chosen:
            kernels.update(
                (ev.name, int(ev.start_ns), int(ev.duration_ns))
                for ev in line.events
                if not ev.name.lower().startswith(("memcpy", "memset"))
            )
    return sorted(kernels, key=lambda k: k[1])


def describe_profile(profile) -> list[str]:
    """One line per plane of a trace (its name, then each line's name and event count): what
    a run that found no kernels prints, so the next run shows why."""
    out = []
    for plane in profile.planes:
        lines = [f"{line.name!r}: {sum(1 for _ in line.events)}" for line in plane.lines]
        out.append(f"plane {plane.name!r}, {len(lines)} lines: " + ", ".join(lines))
    return out or ["the trace has no planes (did CUPTI load? look for 'cupti' in the log)"]


def kernel_summary(kernels: list[tuple[str, int, int]], per: int = 1) -> dict:
    """Busy time (union of kernel intervals), span (first start to last end), count and time per
    kernel name, each divided by `per` (e.g. the number of calls or steps traced), in us."""
    busy, end_so_far = 0, None
    for _, start, dur in kernels:
        end = start + dur
        if end_so_far is None or start >= end_so_far:
            busy += dur
        elif end > end_so_far:
            busy += end - end_so_far
        end_so_far = end if end_so_far is None else max(end_so_far, end)
    by_name: dict[str, list[float]] = {}
    for name, _, dur in kernels:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += dur / 1e3
    span = (max(s + d for _, s, d in kernels) - kernels[0][1]) / 1e3 if kernels else 0.0
    return {
        "busy_us": busy / 1e3 / per,
        "span_us": span / per,
        "kernels": len(kernels) / per,
        "by_name": {
            n: {"count": c / per, "us": t / per}
            for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])
        },
    }


def print_kernel_rows(summary: dict, top: int) -> None:
    """The `top` kernels of a `kernel_summary` by time: us, launches, name (one line each)."""
    for name, v in list(summary["by_name"].items())[:top]:
        print(f"  {v['us']:8.1f} us {v['count']:6.1f}x  {name[:90]}")


def expert_stacks(keys, layers: int, experts: int, d: int, f: int) -> list:
    """Random bf16 expert stacks (std 0.02) drawn on the device a layer at a time, one of the
    three `keys` each: [w_gate, w_up] [L, E, D, F] and w_down [L, E, F, D]."""

    @functools.partial(jax.jit, static_argnums=1)
    def make(key, shape):
        return jax.lax.map(
            lambda k: (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(jnp.bfloat16),
            jax.random.split(key, shape[0]),
        )

    shapes = ((layers, experts, d, f), (layers, experts, d, f), (layers, experts, f, d))
    return [make(k, s) for k, s in zip(keys, shapes)]
