"""Masked diffusion LM decoding: LLaDA's low-confidence remasking (Nie et al. 2025, "Large Language Diffusion
Models", arXiv:2502.09992) with semi-autoregressive blocks, and Fast-dLLM's confidence-threshold parallel
decoding (Wu et al. 2025, arXiv:2505.22618) when `threshold` > 0. The sampler and its notation are in
`unmasking.py`; this strategy is its base rule, with no schedule of its own.

Authors' code: ML-GSAI/LLaDA generate.py (generate, get_num_transfer_tokens) and NVlabs/Fast-dLLM llada/generate.py
(get_transfer_index with threshold, generate_with_prefix_cache, generate_with_dual_cache); the rules match. Departures
not marked in unmasking.py: remasking=margin and entropy come from Dream's sampler (LLaDA and Fast-dLLM offer
low_confidence and random), and the caches reuse K/V only on models of a causal architecture with a KV cache
(CanvasKV): exact under causal attention, the papers' approximate caches on AR-to-diffusion models read
bidirectionally; masked LMs without a KV cache API run without them."""

from __future__ import annotations

from dataclasses import dataclass

from explorer.strategies.unmasking import CACHE_DEPARTURE, UnmaskingConfig, register_diffusion


@dataclass(frozen=True)
class DiffusionConfig(UnmaskingConfig):
    """LLaDA's sampler; threshold > 0 makes it Fast-dLLM's parallel decoding."""


register_diffusion("diffusion", DiffusionConfig, "masked diffusion: unmask the most confident positions per step",
                   paper="Nie et al. 2025, LLaDA, arXiv:2502.09992; Wu et al. 2025, Fast-dLLM, arXiv:2505.22618",
                   reference_code=("ML-GSAI/LLaDA: generate.py: generate; NVlabs/Fast-dLLM: llada/generate.py: "
                                   "get_transfer_index, generate_with_prefix_cache, generate_with_dual_cache; "
                                   "horseee/dKV-Cache: generation_utils/llada_dkv_cache_decode.py: generate"),
                   departures=(
                       "A canvas whose length is not a multiple of block_length gets a shorter last block, and steps "
                       "not divisible by the blocks are spread over them (LLaDA and Fast-dLLM assert both divide).",
                       "On a causal LM the canvas is read causally with a one-position shift (the sampler then reduces "
                       "to AR decoding); LLaDA and Fast-dLLM run a bidirectional mask predictor.",
                       CACHE_DEPARTURE,
                       "remasking=margin and entropy are Dream's scores, not LLaDA's or Fast-dLLM's (their code offers "
                       "low_confidence and random).",
                   ))
