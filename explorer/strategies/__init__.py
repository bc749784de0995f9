"""Decoding strategies. Importing this package fills the registry; each module is one strategy."""

from explorer.strategies import greedy, mirostat, sample, top_h  # noqa: F401  (registers them)
from explorer.strategies.base import REGISTRY, StrategySpec, config_dict, get_strategy, make_config

__all__ = ["REGISTRY", "StrategySpec", "config_dict", "get_strategy", "make_config"]
