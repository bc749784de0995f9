"""A diffusion canvas's stored K/V (`CanvasKV`) and the probe that says whether a model can reuse it."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch

from explorer.models.arch import cache_kwarg
from explorer.models.lm import LanguageModel
from explorer.models.masks import sliding_window


class CanvasKV:
    """A diffusion canvas's per-position K/V, so that a denoising step can recompute some positions and reuse the
    others' K/V from when they were last computed (Fast-dLLM's prefix and dual caches, dKV-Cache's delayed caching,
    Window-Diffusion's buffer). It runs on a model of a causal architecture that takes a KV cache, explicit
    positions and a 4-D mask: a causal LM read causally or bidirectionally (`bidirectional`: the all-visible mask
    AR-to-diffusion adaptation trains with), or an AR-to-diffusion checkpoint that attends both ways by itself
    (dllm's A2D models). Keys are stored after their rotary embedding, so a reused key keeps its position; the 4-D
    mask of a partial pass lets each recomputed position see the reused and recomputed ones (all of them when
    bidirectional, those at or before it when causal). Under causal attention a position's K/V depends only on
    what precedes it, so reuse is exact; bidirectionally a reused K/V is stale wherever the positions it attended
    to have changed since it was computed (the approximation the papers make). `logits` keeps every position's
    latest logits (recomputed rows fresh, the others as last computed)."""

    def __init__(self, lm: LanguageModel, bidirectional: bool, start: int):
        self.check(lm, bidirectional)
        self.lm, self.bidirectional = lm, bidirectional
        self.first_row = start - 1 if lm.canvas_info().shift else start  # logits are kept from this position on
        self.keys: list[torch.Tensor] = []  # per layer (1, kv heads, canvas, head dim)
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # (canvas, vocab), unshifted

    @staticmethod
    def check(lm: LanguageModel, bidirectional: bool | None = None) -> None:
        """Refuse, in one line naming what works, a model whose canvas K/V cannot be reused this way
        (`bidirectional` None: the model's own way of reading a canvas). Probed once per model and reading: a
        partial pass on stored K/V must reproduce the model's own full pass over an unchanged canvas."""
        works = ("choose cache=none (K/V reuse runs on causal-architecture models that take a KV cache: a causal LM, "
                 "also with attention=bidirectional, or an AR-to-diffusion checkpoint such as dllm's A2D models)")
        name = f"{lm.info.model_id} ({type(lm.model).__name__})"
        if sliding_window(lm.model.config) is not None:
            raise ValueError(f"{name} cannot reuse canvas K/V (sliding-window attention): {works}")
        if not _takes_kv_cache(lm.model):
            raise ValueError(f"{name} cannot reuse canvas K/V (its forward takes no KV cache, as masked LMs such as "
                             f"BERT and ModernBERT): {works}")
        own = lm.canvas_info().bidirectional
        both = own if bidirectional is None else bool(bidirectional)
        probed = _CANVAS_SUPPORT.setdefault(lm.model, {})
        if (both, own) not in probed:
            probed[both, own] = None  # while probing (the probe's own CanvasKV comes back here)
            probed[both, own] = _probe_canvas_reuse(lm, both)
        if probed[both, own]:
            raise ValueError(f"{name} cannot reuse canvas K/V ({probed[both, own]}): {works}")

    @torch.inference_mode()
    def run(self, token_ids: Sequence[int], compute: Sequence[int] | None = None,
            reuse: Sequence[int] | None = None) -> torch.Tensor:
        """Logits `(generated, vocab)` of the generated positions (shifted as `canvas_logits`) after recomputing the
        positions `compute` (None: a full pass) on the stored K/V of `reuse` (None: every other position;
        positions in neither are left out of the pass, pruned). With the shift, a recomputed position's
        predecessor is recomputed too."""
        from transformers import DynamicCache

        lm, device = self.lm, self.lm.device
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
        length = ids.shape[0]
        shift = lm.canvas_info().shift
        dtype = next(lm.model.parameters()).dtype
        if compute is None or self.logits is None:
            compute, reuse = list(range(length)), []
        else:
            wanted = set(compute) | ({p - 1 for p in compute if p > 0} if shift else set())
            compute = sorted(wanted)
            reuse = sorted(set(range(length) if reuse is None else reuse) - wanted)
        query = torch.tensor(compute, device=device)
        keys_at = torch.tensor(reuse + compute, device=device)
        allowed = torch.ones(len(compute), len(keys_at), dtype=torch.bool, device=device) if self.bidirectional \
            else keys_at[None, :] <= query[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = DynamicCache(config=lm.model.config)
        if reuse:
            index = torch.tensor(reuse, device=device)
            for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
                cache.update(keys.index_select(2, index), values.index_select(2, index), layer)
        full = not reuse and len(compute) == length
        keep = length - self.first_row if full else 0  # a full pass: the LM head on the generated rows only
        out = lm.model(input_ids=ids[query][None], position_ids=query[None], attention_mask=mask[None, None],
                       **cache_kwarg(lm.model, cache), use_cache=True, logits_to_keep=keep)
        lm.forward_passes += 1
        fresh = out.logits[0].float()  # (computed or kept, vocab)
        if full:  # store everything
            self.keys = [layer.keys.clone() for layer in cache.layers]
            self.values = [layer.values.clone() for layer in cache.layers]
            self.logits = fresh
        else:
            for layer, stored in enumerate(cache.layers):
                self.keys[layer][:, :, query] = stored.keys[:, :, len(reuse):]
                self.values[layer][:, :, query] = stored.values[:, :, len(reuse):]
            rows = query - self.first_row
            self.logits[rows[rows >= 0]] = fresh[rows >= 0]
        return self.logits[:-1].clone() if shift else self.logits.clone()


# model -> {(read bidirectionally, its own reading bidirectional): refusal or None}: whether a partial canvas pass
# on stored K/V reproduces the model's own full pass
_CANVAS_SUPPORT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[bool, bool], str | None]] = \
    weakref.WeakKeyDictionary()


def _takes_kv_cache(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward takes a KV cache: by name, or through **kwargs on a class that generates (a causal
    LM head; a masked LM such as ModernBERT also has **kwargs, but generates nothing and ignores a cache)."""
    parameters = inspect.signature(model.forward).parameters
    if {"past_key_values", "cache"} & set(parameters):
        return True
    keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    can_generate = getattr(model, "can_generate", None)
    return keywords and callable(can_generate) and bool(can_generate())


def _probe_canvas_reuse(lm: LanguageModel, bidirectional: bool) -> str | None:
    """Why canvas K/V reuse gives wrong numbers on `lm` read this way, or None: on a 10-position canvas, the
    stored-K/V full pass must equal the model's own `canvas_logits`, and recomputing two positions on the others'
    stored K/V (nothing changed) must equal that full pass."""
    lm = lm.for_run()  # its own pass counter: the probe is not the run's work
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    ids, start = [(7 * i + 3) % vocab for i in range(10)], 4
    try:
        kv = CanvasKV(lm, bidirectional, start)
        full = kv.run(ids)  # (6, vocab)
        own = lm.canvas_logits(ids, bidirectional=bidirectional, last=len(ids) - start)
        partial = kv.run(ids, [start + 2, start + 3])
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        return f"a pass on stored K/V fails: {type(error).__name__}"
    tolerance = 1e-3 if lm.model.dtype == torch.float32 else 5e-2
    scale = max(1.0, float(own.abs().max()))
    if full.shape != own.shape or float((full - own).abs().max()) > tolerance * scale:
        return "a pass with explicit positions and a 4-D mask differs from its own full pass"
    if float((partial - full).abs().max()) > tolerance * scale:
        return "a partial pass on stored K/V differs from a full pass over the same canvas"
    return None

