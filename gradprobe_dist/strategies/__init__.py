"""Tentative-selection strategies and a name -> class registry for configs."""
from gradprobe_dist.strategies.base import PruningStrategy, ScoredStrategy, SelectionContext
from gradprobe_dist.strategies.magnitude import MagnitudePruning
from gradprobe_dist.strategies.random import RandomPruning
from gradprobe_dist.strategies.wanda import WandaPruning

STRATEGIES: dict[str, type[PruningStrategy]] = {
    "magnitude": MagnitudePruning,
    "wanda": WandaPruning,
    "random": RandomPruning,
}


def build_strategy(name: str, **options) -> PruningStrategy:
    """A strategy from its registry name and keyword options (as in a YAML config)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError as err:
        raise TypeError(f"bad options {options} for strategy {name!r}: {err}") from None


__all__ = ["PruningStrategy", "ScoredStrategy", "SelectionContext", "MagnitudePruning", "WandaPruning",
           "RandomPruning", "STRATEGIES", "build_strategy"]
