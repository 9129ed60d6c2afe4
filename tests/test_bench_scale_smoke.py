"""The scaling benchmark end to end at smoke sizes (one launch, two tiny LLaMA configs, 1 and
3 stages): it runs, writes scale.json and scale.md, and what does not depend on the
machine's speed is right. Timings are not checked: shared machines are too noisy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
transformers = pytest.importorskip("transformers")

from bench.scale import SIZES, count_params, least_squares  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "scale.json").read_text()), (out / "scale.md").read_text(), proc.stdout


@pytest.mark.timeout(1200)  # its setup runs the benchmark: three transformers imports, minutes under load
def test_every_run_reports_time_floor_and_memory(smoke):
    data, markdown, stdout = smoke
    assert data["meta"]["smoke"] is True and "--smoke" in data["meta"]["command"]
    rows = data["rows"]
    assert [(r["model"], r["stages"]) for r in rows] == [("smoke-a", 1), ("smoke-a", 3), ("smoke-b", 1), ("smoke-b", 3)]
    for row in rows:
        assert row["tokens"] == 2 * 2 * 16
        assert row["probe_s"] > 0 and row["floor_s"] > 0
        assert row["probe_over_floor"] == pytest.approx(row["probe_s"] / row["floor_s"])
        # the whole process: at least the import floor, never more than the process's own peak
        assert data["meta"]["bare_import_mib"] * 0.8 < row["peak_rss_mib_per_rank"][0] <= \
            row["process_peak_rss_mib_per_rank"][0] + 1
    assert len(data["stage_cost"]) == 2 and len(data["fits"]) == 2
    assert all(f["points"] == 2 for f in data["fits"])
    assert markdown.strip() in stdout


def test_parameter_counts_match_the_built_models():
    for name in ("smoke-a", "smoke-b", "llama-10m"):
        fields = SIZES[name][0]
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **fields))
        assert count_params(fields) == sum(p.numel() for p in model.parameters()), name


def test_least_squares_recovers_a_line():
    slope, intercept = least_squares([1.0, 2.0, 4.0], [5.0, 7.0, 11.0])
    assert (slope, intercept) == pytest.approx((2.0, 3.0))
