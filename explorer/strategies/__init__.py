"""Decoding strategies. Importing this package fills the registry; each module is one strategy."""

from explorer.strategies import (  # noqa: F401  (importing registers them)
    adablock,
    aded,
    beam,
    cautious,
    ccd,
    contrastive,
    credit_decoding,
    diffusion,
    diverse_beam,
    eoser,
    ete,
    exact_extract,
    first_finish,
    greedy,
    instructive,
    jacobi,
    localleap,
    lookahead,
    mbr,
    mirostat,
    momentum,
    prompt_lookup,
    prophet,
    sample,
    self_speculative,
    spectr,
    speculative,
    token_recycling,
    top_h,
    tree_speculative,
    window_diffusion,
)
from explorer.strategies.base import REGISTRY, StrategySpec, config_dict, get_strategy, make_config

__all__ = ["REGISTRY", "StrategySpec", "config_dict", "get_strategy", "make_config"]
