"""Masked diffusion LM decoding: LLaDA's low-confidence remasking (Nie et al. 2025, "Large Language Diffusion
Models", arXiv:2502.09992) with semi-autoregressive blocks, and Fast-dLLM's confidence-threshold parallel
decoding (Wu et al. 2025, arXiv:2505.22618) when `threshold` > 0. The sampler and its notation are in
`unmasking.py`; this strategy is its base rule, with no schedule of its own."""

from __future__ import annotations

from dataclasses import dataclass

from explorer.strategies.unmasking import UnmaskingConfig, register_diffusion


@dataclass(frozen=True)
class DiffusionConfig(UnmaskingConfig):
    """LLaDA's sampler; threshold > 0 makes it Fast-dLLM's parallel decoding."""


register_diffusion("diffusion", DiffusionConfig, "masked diffusion: unmask the most confident positions per step",
                   paper="Nie et al. 2025, LLaDA, arXiv:2502.09992; Wu et al. 2025, Fast-dLLM, arXiv:2505.22618")
