"""Per-architecture plumbing: where a causal LM keeps its decoder layers and its final norm, the keyword its
forward takes the KV cache by, and a switch to eager attention (the only kind that returns its weights)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

# Where causal LMs keep their decoder layers (attribute paths from the *ForCausalLM module): Llama, Mistral,
# Qwen, Gemma, Phi-3, StableLM, SmolLM3, OLMo 2, Mixtral...; OPT; GPT-2, Falcon; GPT-NeoX.
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


def _walk(module: torch.nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def layer_path(model: torch.nn.Module) -> str:
    """The attribute path of the decoder layers' ModuleList in a causal LM, e.g. 'model.layers'."""
    for path in LAYER_PATHS:
        if isinstance(_walk(model, path), torch.nn.ModuleList):
            return path
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(LAYER_PATHS)}); "
                     "layer-skip drafting needs them")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return _walk(model, layer_path(model))


def decoder_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the decoder layers (and, for most models, the final norm and rotary embedding)."""
    return _walk(model, layer_path(model).rsplit(".", 1)[0])


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    owner = decoder_owner(model)
    for name in FINAL_NORMS:
        norm = getattr(owner, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm
    raise ValueError(f"{type(model).__name__}: cannot find its final norm")


_CACHE_KEYWORD: dict[type, str] = {}


def cache_kwarg(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the keyword `module.forward` takes: `cache` on transformers releases that renamed it (5.2x
    deprecates `past_key_values`), `past_key_values` on older ones and on remote code that still uses it."""
    kind = type(module)
    if kind not in _CACHE_KEYWORD:
        parameters = inspect.signature(module.forward).parameters
        _CACHE_KEYWORD[kind] = "cache" if "cache" in parameters else "past_key_values"
    return {_CACHE_KEYWORD[kind]: cache}


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """Run the block with eager attention (which returns attention weights). The setting is the model's config,
    read at every forward: another run decoding at the same moment on another thread computes the same values
    the slower way while it lasts."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if not on or previous == "eager":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous

