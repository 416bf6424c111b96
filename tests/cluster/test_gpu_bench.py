"""The GPU render benchmark (`bench/gpu_engine.py`) runs end to end with `--tiny` on CPU: the same
code path as on a GPU (device plan, adapter loading, rotation), at test size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_engine.py"


# Several adapters resident at once is the point of the benchmark; peft warns about it.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
@pytest.mark.slow  # runs the benchmark end to end (~40 s on 2 cores)
def test_tiny_run_measures_both_modes(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_engine", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    result = bench.main(
        ["--tiny", "--images", "2", "--warmup", "0", "--adapters", "3", "--json", str(out)]
        + ["--batches", "1", "2"]
    )
    assert result["dtype"] == "float32" and set(result["placement"].values()) == {"cpu"}
    assert result["images_per_s_1_adapter"] > 0 and result["images_per_s_3_rotating"] > 0
    assert result["adapter_load_s_median"] > 0
    assert set(result["batched_images_per_s_1_adapter"]) == {"1", "2"}
    assert result["batched_images_per_s_3_mixed_at_2"] > 0
    assert out.read_text().startswith("{")
