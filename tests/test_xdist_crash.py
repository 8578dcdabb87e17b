"""The suite's xdist scheduler (`xdist_crash.py`): a worker that dies mid-test, or is stopped by
pytest-timeout, costs that one test, and every other test still runs once."""

import pathlib
import subprocess
import sys
import textwrap

TESTS = pathlib.Path(__file__).parent

FILES = {
    "conftest.py": f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from xdist_crash import CrashSafeLoadScope

        def pytest_xdist_make_scheduler(config, log):
            return CrashSafeLoadScope(config, log)
    """,
    "test_a.py": """
        import time
        def test_a1(): time.sleep(0.3)
        def test_a2(): time.sleep(0.3)
        def test_a3(): pass
    """,
    "test_b.py": """
        import os
        def test_b1(): pass
        def test_b_crash(): os.abort()
        def test_b_after(): pass
    """,
    "test_c.py": """
        import os
        def test_c_crash_alone(): os.abort()
    """,
    "test_d.py": """
        import time
        def test_d_hangs(): time.sleep(60)
        def test_d2(): pass
    """,
    "test_e.py": """
        def test_e1(): pass
    """,
}


def test_crashed_and_hung_workers_cost_one_test_each(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadscope", "-p",
         "no:cacheprovider", "-o", "timeout=5", "-o", "timeout_method=thread", "-o",
         "addopts=", str(tmp_path)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    tail = run.stdout.strip().splitlines()[-1]
    assert "3 failed, 7 passed" in tail, run.stdout[-3000:]  # 10 tests, each run once
    for crashed in (
        "test_b.py::test_b_crash",
        "test_c.py::test_c_crash_alone",
        "test_d.py::test_d_hangs",
    ):
        assert f"crashed while running '{crashed}'" in run.stdout
