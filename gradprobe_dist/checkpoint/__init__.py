"""The per-layer mask checkpoint: atomic, verified, fingerprinted files that rank 0 writes."""
