"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def truncated_copy(lm: Any, layers: int, path: Path) -> Path:
    """Save the target cut to its first `layers` layers (a same-vocabulary draft model)."""
    from transformers import AutoModelForCausalLM

    config = lm.model.config.__class__.from_dict(lm.model.config.to_dict())
    config.num_hidden_layers = layers
    draft = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in lm.model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    draft.load_state_dict(state, strict=False)
    draft.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
