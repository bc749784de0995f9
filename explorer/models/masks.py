"""Tree attention masks: which nodes of a draft tree (given as `parents`) each node may attend to, as additive
4-D masks, one per layer type for models that mix sliding-window and full attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from explorer.trees import tree_depths


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """Boolean `(n, n)` matrix: entry (i, j) is true when j is i itself or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    tree_depths(parents)  # validates the ordering
    for i, parent in enumerate(parents):
        mask[i, i] = True
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def sliding_window(config: Any) -> int | None:
    """The sliding window of a model whose attention layers (all, or some) see only the last W positions."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def tree_attention_masks(config: Any, parents: Sequence[int], past_length: int, dtype: torch.dtype,
                         device: torch.device, new: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tree mask for a model: one 4-D mask, or for a model that mixes sliding-window and full attention
    layers (Gemma 2/3) one per layer type. A sliding layer's mask also keeps each node to the positions within
    its window (a key at position k is visible from a node at position q when k > q - W, as transformers'
    sliding masks say), where positions are depths in the tree."""
    full = tree_attention_mask(parents, past_length, dtype, device, new)
    window = sliding_window(config)
    if window is None:
        return full
    sliding = tree_attention_mask(parents, past_length, dtype, device, new, window=window)
    if getattr(config, "layer_types", None) is None:
        return sliding  # every layer slides (Mistral)
    return {"full_attention": full, "sliding_attention": sliding}


def tree_attention_mask(
    parents: Sequence[int], past_length: int, dtype: torch.dtype, device: torch.device, new: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Additive 4-D mask `(1, 1, new, past + tree)` for the last `new` nodes of a tree of `len(parents)` nodes
    that follows `past_length` prefix positions: 0 where a node may attend (the prefix, itself, its
    ancestors; with a sliding `window`, only those at positions > its own - window), the dtype's minimum
    elsewhere."""
    total = len(parents)
    new = total if new is None else new
    allowed = torch.ones(new, past_length + total, dtype=torch.bool)
    allowed[:, past_length:] = ancestor_mask(parents)[total - new:]
    if window is not None:
        depths = torch.tensor(tree_depths(parents))
        key_positions = torch.cat([torch.arange(past_length), past_length + depths])  # (past + tree,)
        query_positions = (past_length + depths)[total - new:]  # (new,)
        allowed &= key_positions[None, :] > query_positions[:, None] - window
    # The structure is built on the host (it comes from Python lists); one boolean copy goes to the device and
    # the additive mask is made there, in the model's dtype.
    blocked = (~allowed).to(device, non_blocking=True)
    mask = torch.zeros(new, past_length + total, dtype=dtype, device=device)
    mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask.reshape(1, 1, new, past_length + total)

