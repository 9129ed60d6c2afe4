"""CI runs the iterative-rounds benchmark at smoke size: it runs and reports every row."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_iterative_benchmark_smoke(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "iterative.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, timeout=300, cwd=REPO, capture_output=True)
    report = json.loads((tmp_path / "iterative.json").read_text())
    assert set(report["subjects"]) == {"lm", "digits"}
    for subject in report["subjects"].values():
        assert len(subject["rows"]) == 2  # the smoke targets
        for row in subject["rows"].values():
            assert set(row) == {"magnitude", "GradProbe one-shot", "GradProbe 3 cubic rounds"}
            assert all(v["mean"] == v["mean"] and v["mean"] > 0 for v in row.values())  # finite, no NaN
    assert (tmp_path / "iterative.md").read_text().count("| 30% |") == 2
