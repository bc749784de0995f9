"""The model adapter: a `LanguageModel` (a transformers model, its tokenizer and what a trace says about them) and
its `KVSession`, which runs the model over *new* tokens only, keeps the KV cache, rolls it back to a length
(`crop`), keeps a path (`keep`) and verifies a token tree in one pass with a 4-D attention mask
(`forward(tokens, parents=...)`). Every forward variant returns one `Pass`."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.models.arch import cache_kwarg, decoder_layers, decoder_owner, eager_attention
from explorer.models.masks import sliding_window, tree_attention_masks
from explorer.params import check_prompt
from explorer.trees import tree_depths


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


@dataclass(frozen=True, slots=True)
class Pass:
    """What one forward pass of a `KVSession` returns: float32 `logits` (their rows as the call says), and where
    the call asked for them the `hidden` states and the `attentions` weights (None otherwise)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    attentions: torch.Tensor | None = None


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
        view.lm, view.cache, view.layers = lm, self.cache, kept
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
    ) -> Pass:
        """Run the model over new tokens appended to the cache; `logits` are float32 `(n, vocab)`.

        With `parents`, the new tokens form a tree: `parents[i]` is the index (among the new tokens) of node
        i's parent, -1 when its parent is the last cached token. Each node then attends to the cache and its
        own ancestors only, at position `length + depth(i)`. A tree can also be grown level by level: with
        `tree_base`, the cached positions from `tree_base` on are the tree's earlier nodes, and `parents` covers
        them and the new ones (indices into the whole tree); new nodes then sit at `tree_base + depth`.
        With `all_logits=False` only the last token's
        logits come back, `(1, vocab)`. With `hidden_states=True` every layer's hidden states come back too,
        `hidden` `(layers + 1, n, hidden)` (index 0 = embeddings, index l + 1 = output of layer l; the last one
        after the final norm). With `attentions=True` the pass runs eager attention (the only kind that returns its
        weights: slower) and every layer's weights come back, `attentions` `(layers, heads, n, kv)`.
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
        self.lm.forward_passes += 1
        self.length += n
        return Pass(
            logits=out.logits[0].float(),  # (n or 1, vocab)
            hidden=torch.stack([h[0] for h in out.hidden_states]) if hidden_states else None,
            attentions=torch.stack([a[0] for a in out.attentions]) if attentions else None,
        )

    @torch.inference_mode()
    def forward_embedding(self, vector: torch.Tensor) -> Pass:
        """Run one input given as an embedding vector `(hidden,)` instead of a token (e.g. a superposition of
        several tokens' embeddings) at the next position; `logits` are the next token's, `(vocab,)`."""
        device = self.lm.device
        embeds = vector.to(device=device, dtype=self.lm.model.dtype).reshape(1, 1, -1)  # (1, 1, hidden)
        positions = torch.tensor([[self.length]], device=device)
        out = self.lm.model(inputs_embeds=embeds, **cache_kwarg(self.lm.model, self.cache), use_cache=True,
                            position_ids=positions, logits_to_keep=1)
        self.lm.forward_passes += 1
        self.length += 1
        return Pass(out.logits[0, -1].float())

    @torch.inference_mode()
    def forward_rows(self, token_ids: Sequence[int], *, hidden_states: bool = False) -> Pass:
        """One new token per row of a batched cache (after `repeat`): `logits` `(rows, vocab)` and, with
        `hidden_states`, the last layer's hidden states, `hidden` `(rows, hidden)`."""
        device = self.lm.device
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(-1, 1)  # (rows, 1)
        positions = torch.full_like(ids, self.length)
        out = self.lm.model(input_ids=ids, **cache_kwarg(self.lm.model, self.cache), use_cache=True,
                            position_ids=positions, output_hidden_states=hidden_states)
        self.lm.forward_passes += 1
        self.length += 1
        return Pass(out.logits[:, -1].float(), out.hidden_states[-1][:, -1] if hidden_states else None)

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
    tree = session.forward([a, b, c], parents=[-1, -1, 1]).logits  # a and b after the prefix, c after b
    chains = [KVSession(lm).forward([*prefix, *rest]).logits[-1] for rest in ([a], [b], [b, c])]
    difference = max(float((tree[i] - chains[i]).abs().max()) for i in range(3))
    scale = max(1.0, max(float(chain.abs().max()) for chain in chains))
    tolerance = 1e-3 if lm.model.dtype == torch.float32 else 5e-2
    if difference <= tolerance * scale:
        return None
    return (f"{lm.info.model_id} ({type(lm.model).__name__}): its attention does not honour a custom tree mask "
            f"with explicit positions (a tree pass differs from plain passes by {difference:.3g} in the logits), "
            "so strategies that verify or draft trees are off for it: use a chain method (speculative, "
            "self_speculative, prompt_lookup, jacobi)")

