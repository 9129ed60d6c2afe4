"""Tentative-selection strategies and a name -> class registry for configs."""
from .base import PruningStrategy, SelectionContext
from .magnitude import MagnitudePruning
from .random import RandomPruning
from .wanda import WandaPruning

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


__all__ = ["PruningStrategy", "SelectionContext", "MagnitudePruning", "WandaPruning",
           "RandomPruning", "STRATEGIES", "build_strategy"]
