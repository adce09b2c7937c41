"""``benchmarks/gpu_profile.py`` (the GPU check's profile section) on the CPU: the fused-linear memory
attribution's arithmetic, a failing part that leaves the other parts' rows, and the CPU fused part end to end."""

from __future__ import annotations

import json

from benchmarks import gpu_profile


def test_attribution_recovers_slope_and_intercept():
    rows = [{"chunk_prompts": c, "extra_mib": 8.0 + 0.25 * c} for c in (64, 128, 256, 512, 1024)]
    got = gpu_profile.attribution(rows, weight_mib=8.0)
    assert got["mib_per_chunk_prompt"] == 0.25 and got["mib_not_shrinking_with_chunk"] == 8.0
    flat = gpu_profile.attribution([{"chunk_prompts": 4, "extra_mib": 3.0}], weight_mib=1.0)
    assert flat["mib_per_chunk_prompt"] == 0.0 and flat["mib_not_shrinking_with_chunk"] == 3.0


def test_a_failing_part_keeps_the_other_parts(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(gpu_profile, "part_graph", boom)
    gpu_profile.main(["--smoke", "--parts", "graph,fused", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_profile.json").read_text())
    assert rows[0] == {"part": "graph", "error": "RuntimeError: capture failed"}
    fused = [r for r in rows if r["part"] == "fused"]
    assert [r["chunk_prompts"] for r in fused][:2] == ["unfused", 13] and all(r["ms"] > 0 for r in fused)
    assert sum(r["default"] for r in fused) == 1
    assert "part=graph error=RuntimeError" in (tmp_path / "gpu_profile.txt").read_text()
