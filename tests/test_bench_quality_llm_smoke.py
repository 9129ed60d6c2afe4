"""bench.quality_llm --smoke on a tiny random LLaMA: every row of a group at the same actual
sparsity, 2:4 rows follow the pattern (both asserted by the bench), and target mode with no
veto is exactly Wanda (the same perplexity)."""
import json

import pytest

from bench import quality_llm


def test_smoke_rows_and_reports(tmp_path):
    report = quality_llm.main(["--smoke", "--out", str(tmp_path)])
    rows = report["rows"]
    assert {r["group"] for r in rows} == {"0.5", "0.5 threshold", "2:4"}
    for group in ("0.5", "2:4"):
        methods = [r["method"] for r in rows if r["group"] == group]
        assert len(methods) == 5 and all(abs(r["sparsity"] - 0.5) < 1e-6 for r in rows if r["group"] == group)
    guarded = [r for r in rows if "guard" in r]
    assert len(guarded) == 5 and all(r["guard"]["kept"] in ("probe veto", "probe threshold", "strategy")
                                     for r in guarded)
    threshold = [r for r in rows if r["group"] == "0.5 threshold"]
    if threshold[0]["guard"]["kept"] == "strategy":  # Wanda at the sparsity it reached, up to a weight per row
        wanda = next(r for r in threshold if r["method"] == "Wanda")
        assert threshold[0]["perplexity"] == pytest.approx(wanda["perplexity"], rel=1e-3)
        assert 0 <= threshold[0]["sparsity"] - wanda["sparsity"] < 1 / 32  # hidden size 32
    assert json.loads((tmp_path / "quality_llm-smoke.json").read_text())["rows"] == rows
    assert "## 2:4" in (tmp_path / "quality_llm-smoke.md").read_text()


def test_target_mode_without_veto_is_wanda(tmp_path):
    rows = quality_llm.main(["--smoke", "--out", str(tmp_path), "--targets", "0.5", "2:4", "--veto", "0",
                             "--methods", "wanda", "target"])["rows"]
    for group in ("0.5", "2:4"):
        wanda, target = [r["perplexity"] for r in rows if r["group"] == group]
        assert wanda == target


def test_merge_joins_seeds_into_mean_and_std(tmp_path):
    for seed in (0, 1):
        quality_llm.main(["--smoke", "--out", str(tmp_path / f"s{seed}"), "--targets", "0.5",
                          "--methods", "magnitude", "wanda", "--seeds", str(seed)])
    report = quality_llm.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")])
    assert len(report["rows"]) == 4
    wanda = [r["perplexity"] for r in report["rows"] if r["method"] == "Wanda"]
    row = next(r for r in report["summary"] if r["method"] == "Wanda")
    assert row["seeds"] == 2 and abs(row["perplexity_mean"] - sum(wanda) / 2) < 1e-9
    assert row["perplexity_std"] > 0  # two calibration seeds give two Wanda masks
    assert (tmp_path / "all" / "quality_llm.png").stat().st_size > 0


def test_iterative_rounds_reach_the_target(tmp_path):
    """The optional iterative row: rounds over Wanda's candidates end at exactly the target,
    in the target's group beside Wanda (the bench asserts equal sparsity within a group),
    guarded against Wanda's own masks."""
    rows = quality_llm.main(["--smoke", "--out", str(tmp_path), "--targets", "0.5", "2:4", "--rounds", "2",
                             "--methods", "wanda", "iterative"])["rows"]
    iterative = [r for r in rows if r["method"].startswith("GradProbe iterative (2 cubic rounds")]
    assert [r["group"] for r in iterative] == ["0.5"]  # no N:M schedule
    assert abs(iterative[0]["sparsity"] - 0.5) < 1e-6
    assert iterative[0]["guard"]["kept"] in ("probe rounds", "strategy")
