"""Reconstruction after pruning: input-Hessian hooks, SparseGPT's OBS math, and applying it
to every layer under any backend."""
