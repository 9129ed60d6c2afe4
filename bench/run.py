"""The whole benchmark in one command (not part of CI; ``--smoke`` versions of each part are).

    python -m bench.run [--out bench/results]

1. ``bench.quality``: trains (or reuses from bench/.cache) the Shakespeare LM and the digits
   MLP, then perplexity / accuracy per method and sparsity over 3 calibration seeds, with plots.
2. ``bench.iterative``: iterative rounds vs one-shot on the same subjects and seeds.
3. ``bench.cost``: probe time vs its floor, sweep vs separate prunes, where GradProbe stalls,
   1 vs 2 ranks per parallel mode, selection time.
Writes ``results.json`` (every part) and ``results.md`` next to each part's own files.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("quality", "iterative", "cost")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--merge-only", action="store_true", help="only merge the parts' existing JSON and Markdown")
    args = parser.parse_args()
    seconds = {}
    for part in () if args.merge_only else PARTS:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"bench.{part}", "--out", str(args.out)], check=True, cwd=ROOT)
        seconds[part] = round(time.perf_counter() - start, 1)
    results = {part: json.loads((args.out / f"{part}.json").read_text()) for part in PARTS}
    results["wall_seconds"] = seconds
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n\n".join((args.out / f"{p}.md").read_text() for p in PARTS))
    print(f"wrote {args.out / 'results.json'} and results.md; wall seconds {seconds}")


if __name__ == "__main__":
    main()
