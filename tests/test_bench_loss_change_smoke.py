"""bench.loss_change --smoke on a tiny random LLaMA: every ranking zeroes the same count per
layer (half of each row's candidates), the pass check and the summary add up, reports written."""
import json
import math

from bench import loss_change


def test_smoke_rankings_and_reports(tmp_path):
    report = loss_change.main(["--smoke", "--out", str(tmp_path)])
    rows, summary = report["rows"], report["summary"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    assert len(layers) == 4 and len(rows) == 4 * (len(loss_change.RANKINGS) + 1)
    for layer in layers:
        zeroed = {r["subset"]: r["zeroed"] for r in rows if r["layer"] == layer}
        halves = {zeroed[label] for label in loss_change.RANKINGS}
        assert len(halves) == 1 and 0 < halves.pop() <= zeroed["all candidates"] // 2
    assert sum(s["lowest_in"] for s in summary if s["lowest_in"] is not None) == len(layers)
    check = report["pass_check"]
    assert math.isclose(check["measured"], check["losses"][1] - check["losses"][0])
    assert all(math.isfinite(r["measured"]) and math.isfinite(r["estimated"]) for r in rows)
    whole = {r["masks"]: r for r in report["whole_model"]}
    assert len(whole) == 4 and whole["dense"]["held_out_loss_change"] == 0.0
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in whole.values())
    assert json.loads((tmp_path / "loss_change-smoke.json").read_text())["rows"] == rows
    assert "Pass check" in (tmp_path / "loss_change-smoke.md").read_text()
