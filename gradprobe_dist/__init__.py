"""GradProbe-dist: gradient-probing pruning, from one process to FSDP2 / ZeRO-3 ranks."""
from .allocation import Allocation
from .decision import ProbeRecord
from .iterative import iterative_prune, schedule_values
from .masking import from_torch_prune, to_torch_prune
from .models import SimpleMLP, TinyGPT, TinyGPTConfig
from .probe import GradProbe
from .strategies import (MagnitudePruning, PruningStrategy, RandomPruning, WandaPruning,
                         build_strategy)

__version__ = "0.1.0"

__all__ = ["GradProbe", "PruningStrategy", "MagnitudePruning", "WandaPruning", "RandomPruning",
           "build_strategy", "SimpleMLP", "TinyGPT", "TinyGPTConfig", "ProbeRecord",
           "to_torch_prune", "from_torch_prune", "Allocation", "iterative_prune", "schedule_values"]
