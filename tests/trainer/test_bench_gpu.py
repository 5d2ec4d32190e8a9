"""The GPU benchmark's code path, run on CPU with its tiny config so that `make bench-gpu` keeps working."""

from __future__ import annotations

import pytest

from tests.bench.bench_gpu import measure


@pytest.mark.slow
def test_the_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    figures = measure(tmp_path, "tiny", ranks=1)
    assert figures["tokens_per_s_per_gpu"] > 0 and figures["model_flops_per_s_per_gpu"] > 0
    assert len(figures["peak_gib"]) == 1 and figures["peak_gib"][0] > 0
    assert figures["sync_save_s"] > 0 and figures["async_save_blocking_s"] > 0
    # Both runs published their checkpoints (the async one at its end) and wrote final/.
    for name in ("sync", "async"):
        assert sorted(p.name for p in (tmp_path / name).glob("checkpoint-*")) == ["checkpoint-4"]
        assert (tmp_path / name / "final" / "config.json").is_file()
