"""Helpers every benchmark shares (one idea per module):

* ``report``: machine facts, Markdown tables, mean/std, ``write_report`` (JSON + Markdown).
* ``timing``: wall + process-CPU clocks; timers through the library's public extension
  points (a strategy wrapper, a backend subclass), never by patching library functions.
* ``memory``: whole-process peak RSS (``VmHWM``), RSS now, a peak-RSS window, and
  ``bare_import_peak_rss``: the floor a process pays for its imports alone.
* ``ranks``: run a function on N real gloo ranks (``run_ranks``) or a module under
  ``torchrun`` (``torchrun_module``, each rank wrapped by ``rank_rss``); every rank reports
  its whole-process peak RSS at the end.
* ``compare``: actual sparsity, N:M validity, and baselines re-run at equal actual sparsity.
* ``methods``: the baselines pruned without a probe (random, magnitude, Wanda, SparseGPT,
  OBS reconstruction, OWL), defined once over the library for every benchmark.
* ``corpus``, ``subjects``, ``workloads``: the Shakespeare text, the trained LM / digits MLP
  subjects, the cost benchmark's seeded models.
* ``quality_tables``, ``cost_tables``, ``plots``: each benchmark's Markdown and figures,
  built from its JSON alone.
"""
