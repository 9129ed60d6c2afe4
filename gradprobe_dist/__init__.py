"""GradProbe-dist: gradient-probing pruning, from one process to FSDP2 / ZeRO-3 ranks."""
from .decision import ProbeRecord
from .masking import from_torch_prune, to_torch_prune
from .models import SimpleMLP, TinyGPT, TinyGPTConfig
from .probe import GradProbe
from .strategies import (MagnitudePruning, PruningStrategy, RandomPruning, WandaPruning,
                         build_strategy)

__version__ = "0.1.0"

__all__ = ["GradProbe", "PruningStrategy", "MagnitudePruning", "WandaPruning", "RandomPruning",
           "build_strategy", "SimpleMLP", "TinyGPT", "TinyGPTConfig", "ProbeRecord",
           "to_torch_prune", "from_torch_prune"]
