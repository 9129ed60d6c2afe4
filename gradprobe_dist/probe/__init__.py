"""The algorithm: the GradProbe facade, its two gradient passes, the record they leave and the
pure decision, plus the statistic, replayed batches, the choice of prunable parameters and
argument checks."""
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.probe.gradprobe import GradProbe

__all__ = ["GradProbe", "ProbeRecord"]
