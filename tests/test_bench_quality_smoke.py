"""``python -m bench.quality --smoke`` end to end: the files it writes and the invariants any
honest run must satisfy, whatever its numbers (no timings, no copy of the method matrix)."""
import json
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("target", "allocation", "metric", "thresholds", "layers")
RUN_KEYS = {"section", "target", "pattern", "seed", "method", "requested", "sparsity", "metric", "matched_to"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.quality", "--smoke", "--out", str(out),
                           "--cache", str(out / "cache")], cwd=ROOT, env=env, timeout=300, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "quality.json").read_text())


def at_target(sub):
    return [r for r in sub["runs"] if r["section"] == "target"]


def better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def test_report_schema_tables_and_plots(smoke):
    out, report = smoke
    meta = report["meta"]
    assert meta["smoke"] is True and meta["command"].startswith("python -m bench.quality --smoke")
    assert meta["machine"]["cpu_cores"] >= 1 and "torch" in meta["machine"]
    assert set(report["subjects"]) == {"lm", "digits"}
    markdown = (out / "quality.md").read_text()
    for name, sub in report["subjects"].items():
        assert {"description", "metric", "higher_is_better", "dense", "summary", "runs"} <= set(sub)
        assert all(RUN_KEYS <= set(r) and math.isfinite(r["metric"]) for r in sub["runs"])
        assert f"## {name}:" in markdown
        for kind in PLOTS:
            assert (out / f"quality_{name}_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown.count("### Headline") == 2


def test_dense_models_learnt_something(smoke):
    subjects = smoke[1]["subjects"]
    assert 1.0 < subjects["lm"]["dense"] < 256  # better than a uniform guess over 256 bytes
    assert subjects["digits"]["dense"] > 0.8


def test_every_row_of_a_comparison_sits_at_the_same_actual_sparsity(smoke):
    """Rows are compared at one sparsity: per (target, pattern, seed) every method's actual
    sparsity is within rounding (per row of >= 32 inputs, per SparseGPT block) of the others."""
    for sub in smoke[1]["subjects"].values():
        groups = defaultdict(list)
        for r in at_target(sub):
            groups[(r["target"], r["pattern"], r["seed"])].append(r["sparsity"])
        assert len(groups) > 1
        for values in groups.values():
            assert max(values) - min(values) <= 1 / 32
        for r in at_target(sub):
            assert abs(r["sparsity"] - r["target"]) <= 1 / 32


def test_threshold_points_are_matched_by_baselines_at_their_own_sparsity(smoke):
    for sub in smoke[1]["subjects"].values():
        sweep = [r for r in sub["runs"] if r["section"] == "sweep"]
        points = [r for r in sweep if r["matched_to"] is None]
        assert points
        for point in points:
            assert 0 < point["sparsity"] <= point["target"]  # the probe keeps part of its selection
            matched = [r for r in sweep if r["seed"] == point["seed"] and r["target"] == point["target"]
                       and r["matched_to"] == {"method": point["method"], "threshold": point["threshold"]}]
            assert {r["method"] for r in matched} >= {"random", "magnitude", "wanda", "sparsegpt"}
            assert all(r["requested"] == point["sparsity"] for r in matched)
            assert all(abs(r["sparsity"] - point["sparsity"]) <= 1 / 32 for r in matched)
        for row in sub["summary"]["at_gradprobe_sparsity"]:
            assert row["max_sparsity_gap"] <= 1 / 32
        curves = defaultdict(list)  # a looser threshold never prunes less
        for p in sorted(points, key=lambda r: r["threshold"]):
            curves[(p["method"], p["target"], p["seed"])].append(p["sparsity"])
        assert all(curve == sorted(curve) for curve in curves.values())


def test_no_pruned_row_is_much_better_than_dense(smoke):
    """Pruning a trained model does not improve it beyond noise: perplexity at most 1% below
    dense, accuracy at most one point above (small MLPs can gain a little at low sparsity)."""
    for sub in smoke[1]["subjects"].values():
        dense, higher = sub["dense"], sub["higher_is_better"]
        for r in sub["runs"]:
            assert (r["metric"] <= dense + 0.01) if higher else (r["metric"] >= 0.99 * dense)


def test_dense_beats_every_method_at_half_sparsity_on_the_lm(smoke):
    lm = smoke[1]["subjects"]["lm"]
    for row in lm["summary"]["at_target"]:
        if row["target"] == 0.5:
            assert row["metric"]["mean"] > lm["dense"], row["label"]


def test_magnitude_beats_random_at_every_unstructured_target(smoke):
    for sub in smoke[1]["subjects"].values():
        means = defaultdict(list)
        for r in at_target(sub):
            if r["pattern"] is None and r["method"] in ("magnitude", "random") and not r["reconstruct"] \
                    and not r["allocation"]:
                means[(r["target"], r["method"])].append(r["metric"])
        targets = {t for t, _ in means}
        assert targets
        for t in targets:
            assert better(statistics.fmean(means[t, "magnitude"]), statistics.fmean(means[t, "random"]),
                          sub["higher_is_better"])


def test_every_row_ran_once_per_seed(smoke):
    seeds = sorted(smoke[1]["meta"]["settings"]["seeds"])
    for sub in smoke[1]["subjects"].values():
        per_row = defaultdict(list)
        for r in at_target(sub):
            per_row[(r["target"], r["pattern"], r["label"])].append(r["seed"])
        assert all(sorted(s) == seeds for s in per_row.values())
        assert len(sub["summary"]["at_target"]) == len(per_row)


def test_reconstruction_keeps_the_mask_size(smoke):
    """With and without reconstruction, the same decision prunes the same count."""
    for sub in smoke[1]["subjects"].values():
        runs = at_target(sub)
        pairs = 0
        for r in runs:
            if r["reconstruct"]:
                twin = next(t for t in runs if not t["reconstruct"] and all(
                    t[k] == r[k] for k in ("target", "pattern", "seed", "method", "oversample", "allocation")))
                assert twin["sparsity"] == r["sparsity"]
                pairs += 1
        assert pairs > 0


def test_semi_structured_rows_follow_the_pattern(smoke):
    for sub in smoke[1]["subjects"].values():
        rows = [r for r in at_target(sub) if r["pattern"]]
        assert rows and all(r["pattern_valid"] is True for r in rows)
