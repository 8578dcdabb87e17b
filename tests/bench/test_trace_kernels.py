"""bench/common.device_kernels reads the kernels of a GPU trace under either naming of its
planes and lines, and describe_profile says what a trace without kernels held (fake
ProfileData-like objects: planes, lines, events)."""

from types import SimpleNamespace as NS

from bench.common import describe_profile, device_kernels, kernel_summary


def event(name, start, dur):
    return NS(name=name, start_ns=start, duration_ns=dur)


def line(name, *events):
    return NS(name=name, events=list(events))


def plane(name, *lines):
    return NS(name=name, lines=list(lines))


HOST = plane("/host:CPU", line("python", event("step", 0, 1000)))


def test_cupti_stream_lines_of_a_gpu_plane():
    gpu = plane(
        "/device:GPU:0",
        line("Stream #7(Compute)", event("gmm", 10, 5), event("fusion_1", 20, 3)),
        line("Stream #9(MemcpyH2D)", event("memcpy", 30, 2)),
        line("XLA Ops", event("custom-call.1", 10, 6)),  # derived: spans gmm, not counted
    )
    kernels = device_kernels(NS(planes=[HOST, gpu]))
    assert kernels == [("gmm", 10, 5), ("fusion_1", 20, 3)]
    assert kernel_summary(kernels)["busy_us"] == 8 / 1e3


def test_other_namings_kernels_line_then_xla_ops():
    kernels_line = plane("/device:GPU:0 (pid 1)", line("Kernels", event("k", 5, 2)))
    assert device_kernels(NS(planes=[kernels_line])) == [("k", 5, 2)]
    ops_only = plane("/device:CUDA:1", line("XLA Modules", event("jit_step", 0, 9)))
    ops_only.lines.append(line("XLA Ops", event("fusion", 1, 4), event("gemm", 6, 2)))
    assert device_kernels(NS(planes=[ops_only])) == [("fusion", 1, 4), ("gemm", 6, 2)]


def test_no_kernels_describes_planes_lines_and_counts():
    gpu = plane("/device:GPU:0", line("Steps"), line("XLA Modules", event("m", 0, 9)))
    profile = NS(planes=[HOST, gpu])
    assert device_kernels(profile) == []
    text = describe_profile(profile)
    assert text[0] == "plane '/host:CPU', 1 lines: 'python': 1"
    assert text[1] == "plane '/device:GPU:0', 2 lines: 'Steps': 0, 'XLA Modules': 1"
    assert "no planes" in describe_profile(NS(planes=[]))[0]


def test_a_stream_that_also_copies_keeps_its_kernels_not_its_copies():
    """CUPTI names a compute stream that also copies 'Stream #14(Compute,MemcpyD2H)': the H200
    train-step profile of jax 0.11.2 held its kernels only there."""
    gpu = plane(
        "/device:GPU:0",
        line(
            "Stream #14(Compute,MemcpyD2H,MemcpyD2D)",
            event("tgmm", 10, 7),
            event("MemcpyD2D", 20, 3),
            event("loop_select_fusion", 30, 4),
        ),
        line("Stream #20(MemcpyH2D)", event("MemcpyH2D", 40, 2)),
    )
    assert device_kernels(NS(planes=[gpu])) == [("tgmm", 10, 7), ("loop_select_fusion", 30, 4)]
