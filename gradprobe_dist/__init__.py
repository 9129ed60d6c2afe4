"""GradProbe-dist: gradient-probing pruning, from one process to FSDP2 / ZeRO-3 ranks."""
from gradprobe_dist.strategies.allocation import Allocation
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.pipeline.iterative import iterative_prune
from gradprobe_dist.pipeline.rounds import schedule_values
from gradprobe_dist.masking import from_torch_prune, to_torch_prune
from gradprobe_dist.models import SimpleMLP, TinyGPT, TinyGPTConfig
from gradprobe_dist.probe.gradprobe import GradProbe
from gradprobe_dist.reconstruct.pruner import SparseGPT
from gradprobe_dist.strategies import (MagnitudePruning, PruningStrategy, RandomPruning,
                                       WandaPruning, build_strategy)

__version__ = "0.1.0"

__all__ = ["GradProbe", "SparseGPT", "PruningStrategy", "MagnitudePruning", "WandaPruning", "RandomPruning",
           "build_strategy", "SimpleMLP", "TinyGPT", "TinyGPTConfig", "ProbeRecord",
           "to_torch_prune", "from_torch_prune", "Allocation", "iterative_prune", "schedule_values"]
