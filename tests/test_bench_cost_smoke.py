"""The cost benchmark end to end at smoke sizes: it runs, writes cost.json and cost.md, and
the numbers that do not depend on the machine's speed are right (timings are not checked:
CI machines are too noisy for them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bench.cost", "--smoke", "--out", str(out),
                           "--modes", "none", "fsdp"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "cost.json").read_text()), (out / "cost.md").read_text(), proc.stdout


def test_records_where_and_how_it_ran(smoke):
    data, markdown, stdout = smoke
    meta = data["meta"]
    assert meta["smoke"] is True and meta["command"].startswith("python -m bench.cost --smoke")
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["machine"]["cpu_cores"] >= 1
    for header in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert header in markdown
    assert markdown.strip() in stdout  # the tables are printed, not only written


def test_probe_breakdown_adds_up(smoke):
    rows = smoke[0]["probe_vs_floor"]
    gpt, mlp = rows
    assert gpt["prunable_weights"] == 12 * 32 * 32  # smoke TinyGPT: 1 block, n_embd 32
    assert mlp["prunable_weights"] == 64 * 32 + 32 * 10
    for row in rows:
        assert row["probe_s"]["wall"] > 0 and row["floor_s"]["wall"] > 0
        *phases, total = row["breakdown"]
        assert sum(p["wall_s"] for p in phases) == pytest.approx(total["wall_s"], rel=1e-9)
        assert sum(p["cpu_s"] for p in phases) == pytest.approx(total["cpu_s"], rel=1e-9)
        # "rest" is the total minus the timed phases: negative would mean a phase was counted twice
        assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in phases)
        assert [p["phase"].split()[0] for p in phases] == ["forward", "backward", "selection", "rest"]
        assert all(p["wall_s"] > 0 for p in phases[:3])


def test_sweep_matches_separate_prunes(smoke):
    sweep = smoke[0]["sweep"]
    assert sweep["same_results"] is True
    assert len(sweep["sweep_sparsities"]) == len(sweep["thresholds"]) == 5
    sparsities = sweep["sweep_sparsities"]
    assert sparsities == sorted(sparsities)  # a higher threshold prunes a superset
    assert 0 < sparsities[-1] <= 0.5


def test_stall_rows_are_consistent(smoke):
    stall = smoke[0]["stall"]
    assert {row["strategy"] for row in stall["rows"]} == {"magnitude (layer)", "wanda"}
    for row in stall["rows"]:
        assert row["selected"] == pytest.approx(row["target"], abs=1e-3)
        reached = [row[f"reached@{t:g}"] for t in stall["thresholds"]]
        assert reached == sorted(reached) and reached[-1] <= row["selected"]
        assert 0 <= row["zero_grad_share"] <= 1 and 0 <= row["grew_share"] <= 1


def test_sharding_halves_the_probe_state(smoke):
    rows = {(row["mode"], row["ranks"]): row for row in smoke[0]["ranks"]["rows"]}
    assert set(rows) == {("none", 1), ("fsdp", 1), ("fsdp", 2)}
    assert rows["none", 1]["comm_share"] == 0  # one process: no collective at all
    assert rows["fsdp", 1]["state_mib"] == rows["none", 1]["state_mib"]  # one rank holds it all
    assert 0.45 <= rows["fsdp", 2]["state_vs_1_rank"] <= 0.55
    assert rows["fsdp", 2]["meets_state_target"] is True
    assert rows["fsdp", 2]["comm_share"] > 0
    for row in rows.values():
        assert row["peak_rss_mib"] > row["state_mib"] > 0


def test_selection_covers_every_strategy(smoke):
    rows = smoke[0]["selection"]
    assert len(rows) == 8  # 4 strategies x 2 models
    assert {row["strategy"] for row in rows} == {"magnitude (layer)", "magnitude (global)", "wanda", "random"}
    for row in rows:
        assert 0 < row["selection_s"] <= row["probe_s"]
