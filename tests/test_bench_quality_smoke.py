"""bench/quality.py --smoke end to end: the files it writes, their structure and sanity.

No timings or quality claims: only what must hold whatever the numbers are.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"random", "magnitude", "wanda", "sparsegpt"}
GRADPROBE = {"gradprobe_magnitude", "gradprobe_wanda"}
PLOTS = ("target", "allocation", "metric", "thresholds", "layers")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "bench/quality.py", "--smoke", "--out", str(out), "--cache", str(out / "cache")],
                   cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)
    return out, json.loads((out / "quality.json").read_text())


def at_target(runs):
    return [r for r in runs if r["section"] == "target"]


def expected_rows(settings, target, pattern):
    """(method, reconstruct, oversample, allocation) of every row the benchmark promises."""
    rows = {(b, False, None, None) for b in ("magnitude", "wanda", "sparsegpt", "sparsegpt_dense_h")}
    rows |= {(b, True, None, None) for b in ("magnitude", "wanda")}
    rows |= {("random_candidates", False, o, None) for o in settings["oversamples"]}
    rows |= {(g, r, o, None) for g in GRADPROBE for o in settings["oversamples"] for r in (False, True)}
    if pattern is None:
        rows.add(("random", False, None, None))
        if target == settings["allocation_target"]:
            rows |= {(b, False, None, "owl") for b in ("magnitude", "wanda")}
            rows |= {(g, r, settings["oversamples"][0], a) for g in GRADPROBE for r in (False, True)
                     for a in settings["allocations"]}
    return rows


def test_writes_json_markdown_and_plots(smoke):
    out, report = smoke
    assert report["meta"]["smoke"] is True
    assert set(report["subjects"]) == {"lm", "digits"}
    markdown = (out / "quality.md").read_text()
    for name in ("lm", "digits"):
        assert f"## {name}:" in markdown
        for kind in PLOTS:
            png = out / f"quality_{name}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for pattern in report["meta"]["settings"]["patterns"]:
        assert markdown.count(f"#### {pattern} (50%)") == 2
    assert markdown.count("### Headline") == 2


def test_dense_models_learnt_something(smoke):
    subjects = smoke[1]["subjects"]
    assert 1.0 < subjects["lm"]["dense"] < 256  # better than a uniform guess over 256 bytes
    assert subjects["digits"]["dense"] > 0.8


def test_every_method_ran_once_per_seed_at_every_target(smoke):
    report = smoke[1]
    settings = report["meta"]["settings"]
    cases = [(t, None) for t in settings["sparsities"]] + [(0.5, p) for p in settings["patterns"]]
    for sub in report["subjects"].values():
        runs = at_target(sub["runs"])
        assert all(math.isfinite(r["metric"]) for r in runs)
        for target, pattern in cases:
            here = [r for r in runs if r["target"] == target and r["pattern"] == pattern]
            keys = {(r["method"], r["reconstruct"], r["oversample"], r["allocation"]) for r in here}
            assert keys == expected_rows(settings, target, pattern)
            for key in keys:
                seeds = sorted(r["seed"] for r in here if (r["method"], r["reconstruct"], r["oversample"],
                                                          r["allocation"]) == key)
                assert seeds == sorted(settings["seeds"])
        assert len(sub["summary"]["at_target"]) == sum(len(expected_rows(settings, *c)) for c in cases)
        assert [(h["target"], h["pattern"]) for h in sub["summary"]["headline"]] == cases


def test_target_mode_hits_the_target(smoke):
    report = smoke[1]
    settings = report["meta"]["settings"]
    for sub in report["subjects"].values():
        for r in at_target(sub["runs"]):
            gap = r["target"] - r["sparsity"]
            if r["method"] in ("sparsegpt", "sparsegpt_dense_h"):  # + weights of never-active inputs
                assert -1 / 32 <= gap <= 1 / 32
            elif r["allocation"]:  # layer sparsities vary, their weighted mean is the target
                assert abs(gap) <= 0.02
                assert max(r["layers"].values()) - min(r["layers"].values()) > 0.01
            elif r["method"] == "wanda":  # rounded down per output row of >= 32 inputs
                assert 0 <= gap <= 1 / 32
            else:  # rounded down per layer of >= 640 weights
                assert 0 <= gap <= 1 / 640
            if r["method"] in GRADPROBE:
                assert r["equivalent_threshold"] >= 0
                assert r["oversample"] in settings["oversamples"]


def test_reconstruction_keeps_the_mask_size(smoke):
    """With and without reconstruction, the same probe's decision prunes the same count."""
    for sub in smoke[1]["subjects"].values():
        runs = at_target(sub["runs"])
        pairs = 0
        for r in runs:
            if r["reconstruct"] and r["method"] != "sparsegpt":
                twin = next(t for t in runs if not t["reconstruct"] and all(
                    t[k] == r[k] for k in ("target", "pattern", "seed", "method", "oversample", "allocation")))
                assert twin["sparsity"] == r["sparsity"]
                pairs += 1
        assert pairs > 0


def test_semi_structured_rows_follow_the_pattern(smoke):
    for sub in smoke[1]["subjects"].values():
        rows = [r for r in at_target(sub["runs"]) if r["pattern"]]
        assert rows
        for r in rows:
            assert r["pattern_valid"] is True
            if r["method"].startswith("sparsegpt"):
                assert r["sparsity"] >= 0.5
            else:
                assert r["sparsity"] == 0.5  # every row length of both subjects is a multiple of 4
        assert all(row["pattern_valid"] for row in sub["summary"]["at_target"] if row["pattern"])


def test_threshold_sweep_ran_with_matched_baselines(smoke):
    report = smoke[1]
    settings = report["meta"]["settings"]
    per_point = len(GRADPROBE) * len(settings["thresholds"]) * (1 + len(BASELINES))
    for sub in report["subjects"].values():
        sweep = [r for r in sub["runs"] if r["section"] == "sweep"]
        assert len(sweep) == len(settings["sparsities"]) * len(settings["seeds"]) * per_point
        assert {r["method"] for r in sweep} == BASELINES | GRADPROBE
        assert all(math.isfinite(r["metric"]) for r in sweep)
        assert len(sub["summary"]["at_gradprobe_sparsity"]) == (
            len(settings["sparsities"]) * len(GRADPROBE) * len(settings["thresholds"]))


def test_threshold_sweep_sparsities_are_honest(smoke):
    report = smoke[1]
    settings = report["meta"]["settings"]
    for sub in report["subjects"].values():
        sweep = [r for r in sub["runs"] if r["section"] == "sweep"]
        for r in sweep:
            if r["method"] in GRADPROBE:
                assert 0 < r["sparsity"] <= r["target"]  # the probe only keeps part of its selection
                assert max(r["layers"].values()) <= r["target"] + 1e-9
            else:  # baselines hit what they were asked for, rounded down per row of >= 32 weights;
                # SparseGPT also zeroes the weights of inputs never active in calibration
                assert abs(r["sparsity"] - r["requested"]) <= 1 / 32
                assert r["method"] == "sparsegpt" or r["sparsity"] <= r["requested"] + 1e-9
        for row in sub["summary"]["at_gradprobe_sparsity"]:
            assert row["max_sparsity_gap"] <= 1 / 32  # baselines compared at GradProbe's own sparsity
        for variant in GRADPROBE:  # a looser threshold never prunes less
            for target in settings["sparsities"]:
                for seed in settings["seeds"]:
                    curve = [next(r["sparsity"] for r in sweep if r["method"] == variant and r["target"] == target
                                  and r["seed"] == seed and r["threshold"] == t) for t in settings["thresholds"]]
                    assert curve == sorted(curve)
