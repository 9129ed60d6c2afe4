"""GradProbe-dist benchmarks. Run each from the repository root as a module:

    python -m bench.quality [--smoke]     # masks: perplexity / accuracy at equal actual sparsity
    python -m bench.iterative [--smoke]   # iterative rounds vs one-shot
    python -m bench.cost [--smoke]        # probe time vs its floor, ranks x parallel modes
    python -m bench.run                   # all three, merged into bench/results/results.{json,md}

Each prints a Markdown table and writes JSON (with the machine it ran on) to ``--out``
(default ``bench/results/``). Shared helpers live in ``bench.lib``.
"""
