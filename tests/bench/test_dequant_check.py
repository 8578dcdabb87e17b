"""bench/dequant_check.py's CPU path: every kernel call it compares on the GPU lowers for CUDA
with the PTX tiles, and it writes its JSON."""

import json

from bench import dequant_check


def test_every_call_lowers_with_the_ptx_tiles_and_the_json_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert dequant_check.main(["--tokens", "1"]) == 0
    result = json.loads((tmp_path / "dequant_check.json").read_text())
    assert result["failures"] == 0 and len(result["rows"]) == 6  # 3 kernels x 2 formats
    assert all(row["lowered_for_cuda"] for row in result["rows"])
    assert dequant_check.weight_tiles.DEQUANT == "auto"  # left as found
