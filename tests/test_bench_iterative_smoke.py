"""CI runs the iterative-rounds benchmark at smoke size: it runs and reports every row."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_iterative_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.iterative", "--smoke", "--out", str(tmp_path),
                           "--cache", str(tmp_path / "cache")], timeout=300, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "iterative.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["machine"]["cpu_cores"] >= 1
    targets = report["meta"]["settings"]["sparsities"]
    assert set(report["subjects"]) == {"lm", "digits"}
    for subject in report["subjects"].values():
        assert set(subject["rows"]) == {str(t) for t in targets}
        for row in subject["rows"].values():
            assert set(row) == {"magnitude", "GradProbe one-shot", "GradProbe 3 cubic rounds"}
            assert all(math.isfinite(v["mean"]) and v["mean"] > 0 for v in row.values())
            assert all(v["n"] == len(report["meta"]["settings"]["seeds"]) for v in row.values())
    assert (tmp_path / "iterative.md").read_text().count("| 30% |") == 2
