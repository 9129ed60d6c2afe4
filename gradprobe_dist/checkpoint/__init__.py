"""The per-layer mask checkpoint: atomic, verified, fingerprinted files that rank 0 writes.

``files`` (atomic writes), ``masks`` (the layer file format), ``format`` (the manifest and
what a resume compares), ``store`` (one checkpoint directory), ``lock`` (one job per
directory), ``relay`` (the rank-0 store every rank talks to)."""
from gradprobe_dist.checkpoint.format import (CheckpointMismatchError, CorruptCheckpointError,
                                              PartialCheckpointError, config_hash,
                                              model_fingerprint, read_manifest)
from gradprobe_dist.checkpoint.lock import DirectoryInUseError, DirectoryLock
from gradprobe_dist.checkpoint.masks import apply_masks
from gradprobe_dist.checkpoint.store import MaskCheckpoint, load_masks

__all__ = ["MaskCheckpoint", "load_masks", "apply_masks", "model_fingerprint", "config_hash",
           "read_manifest", "CheckpointMismatchError", "CorruptCheckpointError",
           "PartialCheckpointError", "DirectoryLock", "DirectoryInUseError"]
