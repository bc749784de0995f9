"""Trained draft heads that read the target's own features (EAGLE, Li, Wei, Zhang, Zhang 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv:2401.15077), with a reduced draft
vocabulary (FR-Spec, Zhao et al. 2025, arXiv:2502.14856; EAGLE-3's d2t map).

Notation: f_i = the target's feature at position i (its last hidden state, after the final norm: what its LM head
reads to predict token i + 1), e(x) = the target's (frozen) token embedding, W = the target's (frozen) LM head,
V_d = the draft vocabulary (the K tokens the head may propose, ids into the target's vocabulary).
The head: g_i = FC([e(x_(i+1)); f_i]) (2H -> H), one decoder layer of the target's architecture (its own
weights, its own KV cache) and a final norm over the sequence g, giving the predicted feature f^_(i+1); the
draft distribution is softmax(f^_(i+1) W[V_d]^T) over V_d (zero outside it). Drafting goes on in feature space:
the next input pairs the drafted token with the predicted feature.
Training (explorer/train_drafter.py): teacher-forced target passes give (x, f) sequences; loss = SmoothL1(f^, f)
+ w_ce CE(softmax(f^ W[V_d]^T), softmax(f W[V_d]^T)), as EAGLE's regression + classification against the target's
own next-token distribution (restricted to V_d).
Saved as `head.safetensors` (fp16) + `head.json` (the architecture, V_d, the target it was trained for, the
training record); the target's embedding and LM head are not saved (they are the target's).
Departure: EAGLE-1's head has no final norm and its decoder layer no input norm (it regresses the normed last
hidden state directly); ours keeps both (the norm keeps f^ on the features' scale). Published EAGLE-1 heads load
as released (`load_published`: those two norms are identities there) and Medusa-1 heads likewise.
Published formats (`load_published`, a directory or a Hub id with config.json + weights):
- EAGLE-1 (e.g. yuhuili/EAGLE-Vicuna-7B-v1.3): `fc.weight`, `fc.bias`, `layers.0.*` (no input_layernorm),
  config.json a Llama config with one hidden layer; drafts over the whole vocabulary. Checkpoints saved with an
  older transformers also hold `layers.0.self_attn.rotary_emb.inv_freq` (a persistent buffer then): such buffers,
  computed from the config, are ignored (NON_WEIGHT_BUFFERS; the authors' loader reads with strict=False).
- Medusa-1 (e.g. FasterDecoding/medusa-vicuna-7b-v1.3): `medusa_lm_head.safetensors` / `.pt` with
  `{head}.{layer}.linear.weight|bias` (ResBlocks) and `{head}.{medusa_num_layers}.weight` (hidden -> vocab),
  config.json with medusa_num_heads, medusa_num_layers.
- EAGLE-3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B; Li et al. 2025, arXiv:2503.01840): `fc.weight` (3H -> H),
  `midlayer.{input_layernorm, hidden_norm, self_attn.*, post_attention_layernorm, mlp.*}`, `norm.weight`,
  `lm_head.weight` over the draft vocabulary, `d2t` (target id = d + d2t[d]); config.json a Llama config with
  `draft_vocab_size`. Read as Eagle3Head below.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explorer.draft_source import AUTO, EAGLE_HEAD, MODEL, DraftSource
from explorer.models import cache_kwarg, decoder_layers

HEAD_FILE, CONFIG_FILE = "head.safetensors", "head.json"
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "drafters"  # heads that come with the repository
# Buffers a released checkpoint may hold that are no weights (recomputed from the config): ignored when loading.
NON_WEIGHT_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def body_config(target_config: Any) -> Any:
    """The target's config cut to one decoder layer with a vocabulary of one (the head never embeds ids)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers, config.vocab_size = 1, 1
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    return config


class EagleHead(nn.Module):
    """FC + one decoder layer + norm over [e(x_(i+1)); f_i] -> f^_(i+1), scored against W[V_d]."""

    def __init__(self, target_config: Any, draft_ids: list[int], *, eagle1: bool = False):
        super().__init__()
        from transformers import AutoModel

        hidden = target_config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=eagle1)
        self.body = AutoModel.from_config(body_config(target_config))
        self.body.embed_tokens = None  # inputs come as vectors
        if eagle1:  # EAGLE-1 as released: no input norm in its layer, no final norm
            self.body.layers[0].input_layernorm = nn.Identity()
            self.body.norm = nn.Identity()
        self.register_buffer("draft_ids", torch.tensor(draft_ids, dtype=torch.long), persistent=False)
        self.target_config = target_config
        self._rows: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (key, W[V_d]), kept by `logits`

    def feature(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's input feature from a pass's stacked hidden states (layers + 1, positions, H): the last."""
        return hidden_states[-1]

    def predict(self, embeds: torch.Tensor, features: torch.Tensor, cache: Any = None,
                position_ids: torch.Tensor | None = None, attention_mask: Any = None) -> torch.Tensor:
        """f^ for each (e(x_(i+1)), f_i) pair: `embeds`, `features` (batch, n, hidden) -> (batch, n, hidden)."""
        inputs = self.fc(torch.cat([embeds, features], dim=-1))
        out = self.body(inputs_embeds=inputs, **cache_kwarg(self.body, cache), use_cache=cache is not None,
                        position_ids=position_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def logits(self, predicted: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Scores over V_d: (..., hidden) -> (..., K). The rows W[V_d] are gathered once per LM head, dtype and mode
        and kept (gathering them, 8192 x 576 floats, cost 3.4 ms per draft token: more than the product itself)."""
        key = (lm_head_weight.data_ptr(), lm_head_weight._version, predicted.dtype, predicted.device,
               torch.is_inference_mode_enabled())  # an inference-mode tensor must not reach autograd
        kept = self._rows  # one read and one write of a (key, rows) pair: lanes in threads share a head
        if kept is None or kept[0] != key:
            kept = (key, lm_head_weight[self.draft_ids].to(predicted.dtype))
            self._rows = kept
        return predicted @ kept[1].T


class _FusedInput(nn.Module):
    """EAGLE-3's layer input: [RMSNorm_e(e(x)); RMSNorm_h(g)] (2H), put where the decoder layer's input norm sits, so
    that the layer's residual stream stays g (H). The embedding rows are handed over before each call."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embeds: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(self.embeds), self.hidden_norm(hidden)], dim=-1)


class Eagle3Head(nn.Module):
    """EAGLE-3's draft head as released (Li, Wei, Zhang, Zhang 2025, "EAGLE-3: Scaling up Inference Acceleration of
    Large Language Models via Training-Time Test", arXiv:2503.01840). Its input feature is the fusion of three of
    the target's hidden states, low/mid/high: the inputs of decoder layers 2, L//2 and L-3 (hidden_states[i] in
    transformers' numbering), g = FC([h_low; h_mid; h_high]) (3H -> H). One Llama decoder layer whose attention
    reads [norm(e(x)); norm(g)] (2H) with g as its residual stream gives a; the draft scores are
    lm_head(norm(a)) over the draft vocabulary (its own trained head, K x H), mapped to target ids by d2t.
    Drafting on, a itself is the next input feature (no FC: it is already H wide), as the authors' code does."""

    def __init__(self, config: Any, d2t: torch.Tensor, target_layers: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        body = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("architectures", "auto_map")})
        body.num_hidden_layers, body.vocab_size, body.layer_types = 1, 1, None
        body.pad_token_id = body.bos_token_id = body.eos_token_id = None
        hidden = body.hidden_size
        self.fc = nn.Linear(3 * getattr(config, "target_hidden_size", hidden), hidden, bias=False)
        self.body = LlamaModel(body)
        self.body.embed_tokens = None
        layer = self.body.layers[0]
        layer.input_layernorm = _FusedInput(body)
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attention, name)
            setattr(attention, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        self.body.norm = nn.Identity()  # a (pre-norm) is what drafting feeds back; the norm is for scoring only
        self.norm = type(layer.post_attention_layernorm)(hidden, eps=body.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, len(d2t), bias=False)
        self.register_buffer("draft_ids", torch.arange(len(d2t)) + d2t.long(), persistent=False)
        self.feature_layers = (2, target_layers // 2, target_layers - 3)
        self.target_config = config

    def feature(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's input: the stacked hidden states (layers + 1, positions, H) -> (positions, 3H)."""
        return torch.cat([hidden_states[i] for i in self.feature_layers], dim=-1)

    def predict(self, embeds: torch.Tensor, features: torch.Tensor, cache: Any = None,
                position_ids: torch.Tensor | None = None, attention_mask: Any = None) -> torch.Tensor:
        inputs = self.fc(features) if features.shape[-1] != self.fc.out_features else features
        fused = self.body.layers[0].input_layernorm
        fused.embeds = embeds.to(inputs.dtype)
        try:
            out = self.body(inputs_embeds=inputs, **cache_kwarg(self.body, cache), use_cache=cache is not None,
                            position_ids=position_ids, attention_mask=attention_mask)
        finally:
            fused.embeds = None
        return out.last_hidden_state

    def logits(self, predicted: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Scores over the draft vocabulary from the head's own LM head (the target's is not used)."""
        return self.lm_head(self.norm(predicted))


class ResBlock(nn.Module):
    """Medusa's block: h + SiLU(W h + b)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # starts as the identity, as Medusa initialises it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """Medusa-1 (Cai et al. 2024, arXiv:2401.10774): head k (k = 1..K) reads the target's last hidden state h_t
    (what its LM head reads to predict x_(t+1)) and predicts x_(t+1+k): ResBlock, then a linear layer over V_d
    (initialised from the target's LM head rows, as Medusa initialises from the LM head)."""

    def __init__(self, target_config: Any, draft_ids: list[int], count: int,
                 lm_head_weight: torch.Tensor | None = None, layers: int = 1):
        super().__init__()
        hidden = target_config.hidden_size
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(hidden) for _ in range(layers))) for _ in range(count))
        self.outputs = nn.ModuleList(nn.Linear(hidden, len(draft_ids), bias=False) for _ in range(count))
        if lm_head_weight is not None:
            for output in self.outputs:
                output.weight.data.copy_(lm_head_weight[torch.tensor(draft_ids)].float())
        self.register_buffer("draft_ids", torch.tensor(draft_ids, dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (K, ..., |V_d|): head k's scores for x_(t+1+k)."""
        return torch.stack([output(block(hidden)) for block, output in zip(self.blocks, self.outputs, strict=True)])


def head_record(head: nn.Module, target: Any, extra: dict[str, Any]) -> dict[str, Any]:
    kind = "medusa" if isinstance(head, MedusaHeads) else "eagle"
    count = {"heads": len(head.blocks), "layers": len(head.blocks[0])} if kind == "medusa" else {}
    return {"kind": kind, **count, "target_model": target.info.model_id,
            "target_weights_hash": target.info.weights_hash,
            "hidden_size": target.model.config.hidden_size, "draft_ids": head.draft_ids.tolist(), **extra}


def save_head(head: nn.Module, target: Any, directory: str | Path, extra: dict[str, Any]) -> Path:
    """Write head.safetensors (fp16) and head.json (with the weights' sha256) into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(directory / HEAD_FILE))
    digest = hashlib.sha256((directory / HEAD_FILE).read_bytes()).hexdigest()
    record = head_record(head, target, {**extra, "sha256": digest})
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    return directory


def load_head(target: Any, directory: str | Path, kind: str = "eagle") -> nn.Module:
    """A head saved by `save_head` for this target (its hidden size and vocabulary are checked)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / HEAD_FILE).is_file():
        raise ValueError(f"{directory} holds no draft head ({CONFIG_FILE} + {HEAD_FILE})")
    record = json.loads((directory / CONFIG_FILE).read_text())
    if record.get("hidden_size") != target.model.config.hidden_size:
        raise ValueError(f"the head in {directory} was trained for hidden size {record.get('hidden_size')}, this "
                         f"model has {target.model.config.hidden_size}")
    vocab = target.model.config.vocab_size
    if max(record["draft_ids"]) >= vocab:
        raise ValueError(f"the head in {directory} drafts token ids past this model's vocabulary of {vocab}")
    if record.get("kind", "eagle") != kind:
        raise ValueError(f"{directory} holds a {record.get('kind')} head, not a {kind} head")
    head = (EagleHead(target.model.config, record["draft_ids"]) if kind == "eagle"
            else MedusaHeads(target.model.config, record["draft_ids"], int(record["heads"]),
                             layers=int(record.get("layers", 1))))
    state = load_file(str(directory / HEAD_FILE))
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    head.record = record
    return head.to(device=target.device, dtype=target.model.dtype).eval()


def _read_weights(directory: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in names:
        path = directory / name
        if path.is_file():
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory} has none of {', '.join(names)}")


def _published_directory(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"]))
    except Exception as error:  # noqa: BLE001 - the Hub's many errors become one line
        raise ValueError(f"cannot load the drafter {source!r}: {str(error).splitlines()[0]}") from None


def load_published(target: Any, source: str, kind: str) -> nn.Module:
    """A head in its authors' released format (see the module docstring), from a directory or a Hub id."""
    directory = _published_directory(source)
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    hidden, vocab = target.model.config.hidden_size, target.model.config.vocab_size
    if config.get("hidden_size", hidden) != hidden:
        raise ValueError(f"the drafter {source!r} was trained for hidden size {config.get('hidden_size')}, this "
                         f"model has {hidden}")
    if kind == "medusa":
        state = _read_weights(directory, ("medusa_lm_head.safetensors", "medusa_lm_head.pt"))
        heads, layers = int(config.get("medusa_num_heads", 0)), int(config.get("medusa_num_layers", 1))
        if not heads:
            heads = len({key.split(".")[0] for key in state})
        head = MedusaHeads(target.model.config, list(range(vocab)), heads, layers=layers)
        mapped = {}
        for key, value in state.items():
            index, layer, *rest = key.split(".")
            mapped[f"outputs.{index}.weight" if int(layer) == layers else f"blocks.{index}.{layer}.{'.'.join(rest)}"] \
                = value
    else:
        state = _read_weights(directory, ("model.safetensors", "pytorch_model.bin"))
        if any(key.startswith("midlayer.") for key in state):
            return _load_eagle3(target, source, config, state)
        head = EagleHead(target.model.config, list(range(vocab)), eagle1=True)
        mapped = {("" if key.startswith("fc.") else "body.") + key: value for key, value in state.items()
                  if not key.startswith("embed_tokens")}
    return _fill(head, mapped, target, source, f"released {kind}", {"kind": kind, "published": source, **config})


def _fill(head: nn.Module, mapped: dict[str, torch.Tensor], target: Any, source: str, what: str,
          record: dict[str, Any]) -> nn.Module:
    """Load released weights (renamed to ours) into `head`; a shape or a name that does not fit is one line.
    Known non-weight buffers (NON_WEIGHT_BUFFERS) are dropped first; any other name the head lacks is refused."""
    mapped = {k: v for k, v in mapped.items() if not k.endswith(NON_WEIGHT_BUFFERS)}
    try:
        missing, unexpected = head.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)
    except RuntimeError as error:  # shapes that do not fit this model
        raise ValueError(f"the drafter {source!r} does not fit this model: "
                         f"{str(error).splitlines()[-1].strip()}") from None
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"the drafter {source!r} is not a {what} head: missing "
                         f"{', '.join(missing[:3]) or 'nothing'}, unexpected {', '.join(unexpected[:3]) or 'nothing'}")
    head.record = record
    return head.to(device=target.device, dtype=target.model.dtype).eval()


def _load_eagle3(target: Any, source: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """An EAGLE-3 head as released (Eagle3Head): its Llama config, `midlayer.*` renamed to our one-layer body."""
    from transformers import LlamaConfig

    vocab = target.model.config.vocab_size
    if config.get("vocab_size", vocab) != vocab:
        raise ValueError(f"the drafter {source!r} was trained for a vocabulary of {config.get('vocab_size')}, this "
                         f"model has {vocab}")
    layers = len(decoder_layers(target.model))
    if layers < 4:
        raise ValueError(f"an EAGLE-3 head reads layers 2, L/2 and L-3 of its target: this model has {layers}")
    draft = int(config.get("draft_vocab_size") or vocab)
    d2t = state.get("d2t", torch.zeros(draft, dtype=torch.long))
    if len(d2t) != draft or int((torch.arange(draft) + d2t.long()).max()) >= vocab:
        raise ValueError(f"the drafter {source!r} has a d2t map that does not fit its draft vocabulary of {draft} "
                         f"and this model's vocabulary of {vocab}")
    known = set(LlamaConfig().to_dict()) | {"draft_vocab_size", "target_hidden_size"}
    head = Eagle3Head(LlamaConfig(**{k: v for k, v in config.items() if k in known}), d2t, layers)
    names = {"input_layernorm.": "input_layernorm.input_layernorm.", "hidden_norm.": "input_layernorm.hidden_norm."}
    mapped = {}
    for key, value in state.items():
        if key.startswith("midlayer."):
            rest = key.removeprefix("midlayer.")
            for old, new in names.items():
                rest = new + rest.removeprefix(old) if rest.startswith(old) else rest
            mapped["body.layers.0." + rest] = value
        elif key.split(".")[0] in ("fc", "norm", "lm_head"):
            mapped[key] = value
    return _fill(head, mapped, target, source, "released EAGLE-3",
                 {"kind": "eagle", "format": "eagle3", "published": source, **config})


def shipped_head(target: Any, kind: str = "eagle") -> Path | None:
    """The head shipped in assets/drafters for this target (matched by its weights' hash, else its id)."""
    for manifest in sorted(SHIPPED.glob(f"*/{CONFIG_FILE}")):
        record = json.loads(manifest.read_text())
        if record.get("kind", "eagle") != kind:
            continue
        if target.info.weights_hash and record.get("target_weights_hash") == target.info.weights_hash:
            return manifest.parent
        if record.get("target_model") == target.info.model_id:
            return manifest.parent
    return None


def check_head_architecture(target: Any) -> None:
    """A head copies one decoder layer of the target's architecture: it needs decoder layers to copy."""
    if not len(decoder_layers(target.model)):
        raise ValueError("an EAGLE head needs a decoder-only target")


_LOADED: dict[tuple[str, str, str], nn.Module] = {}  # (target weights, kind, head source) -> the loaded head


def resolve_head(target: Any, source: str, kind: str) -> nn.Module:
    """The head a strategy drafts with: `source` empty, 'eagle-head' or 'auto' -> the head shipped for this
    target; a directory with head.json -> ours; anything else -> a released head (load_published). Loaded once per
    process."""
    parsed = DraftSource.parse(source, empty=EAGLE_HEAD)
    if parsed.kind not in (EAGLE_HEAD, AUTO, MODEL):  # 'target', 'layer-skip'
        raise ValueError(f"{parsed.kind!r} is a draft model, not a trained head: leave {kind}'s drafter empty for "
                         "the head shipped for this model, or give a head's directory")
    source = parsed.name
    if parsed.kind != MODEL:
        shipped = shipped_head(target, kind)
        if shipped is None:
            raise ValueError(f"{kind} needs a trained head: none ships for this model, set drafter to a directory "
                             f"written by `python -m explorer train-drafter --kind {kind}`")
        source = str(shipped)
    path = Path(source).expanduser()
    key = (f"{target.info.model_id}@{target.info.weights_hash}", kind,
           str(path.resolve()) if path.exists() else source)
    if key not in _LOADED:
        _LOADED[key] = (load_head(target, path, kind) if (path / CONFIG_FILE).is_file()
                        else load_published(target, source, kind))
    return _LOADED[key]
