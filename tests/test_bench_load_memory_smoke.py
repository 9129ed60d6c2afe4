"""The load-memory benchmark end to end at smoke size (a tiny LLaMA, the ZeRO-3 rows): it runs,
writes load_memory.json and load_memory.md, and every row carries its peaks. The peaks of a
model this small are noise next to the process's own; the real numbers are in README."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")


@pytest.mark.timeout(900)
def test_the_zero3_rows_report_load_and_ready_peaks_per_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bench.load_memory", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "load_memory.json").read_text())
    assert data["meta"]["smoke"] is True
    assert [(r["parallel"], r["loading"]) for r in data["rows"]] == [("zero3", "whole"), ("zero3", "sharded")]
    for row in data["rows"]:
        assert len(row["load_above_floor_mib_per_rank"]) == len(row["floor_mib_per_rank"]) == 2
        assert row["ready_s"] >= row["load_s"] > 0
        # a whole-life peak never falls: ready >= loaded, both at or above the floor (rounding aside)
        for load, ready in zip(row["load_above_floor_mib_per_rank"], row["ready_above_floor_mib_per_rank"]):
            assert -1 < load <= ready
    assert (tmp_path / "load_memory.md").read_text().strip() in proc.stdout
