"""Helpers every benchmark shares (one idea per module):

* ``report``: machine facts, Markdown tables, mean/std, ``write_report`` (JSON + Markdown).
* ``timing``: wall + process-CPU clocks; timers through the library's public extension
  points (a strategy wrapper, a backend subclass), never by patching library functions.
* ``memory``: peak RSS of the whole process (``getrusage``), RSS now, a peak-RSS window, and
  ``bare_import_peak_rss``: the floor a process pays for its imports alone.
* ``ranks``: run a function on N real gloo ranks (``run_ranks``) or a module under
  ``torchrun`` (``torchrun_module``); each rank reports its whole-process peak RSS at the end.
* ``compare``: actual sparsity, N:M validity, and baselines re-run at equal actual sparsity.
* ``corpus``, ``subjects``: the Shakespeare text and the trained LM / digits MLP subjects.
* ``methods``: the baselines pruned without a probe (random, magnitude, Wanda, SparseGPT,
  OBS reconstruction, OWL), defined once for every benchmark.
* ``plots``: the quality benchmark's figures.
"""
