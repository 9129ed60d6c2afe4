"""The original workflow example runs end to end and keeps its promises."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prune_mlp_example():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "prune_mlp.py")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    dense = float(re.search(r"dense accuracy: ([\d.]+)", out).group(1))
    pruned, tuned = (float(x) for x in re.findall(r"sparsity ([\d.]+)%", out)[:2])
    assert dense > 0.9
    assert 0 < pruned <= 50 and tuned == pruned  # fine-tuning kept every pruned weight at zero
    sweep = [float(s) for s in re.findall(r"^\s+[\d.]+\s+([\d.]+)%", out, re.M)]
    assert len(sweep) == 6 and sweep == sorted(sweep)
