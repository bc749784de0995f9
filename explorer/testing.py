"""Tiny randomly initialised models with a real (character-level) tokenizer, built in code.

Tests and demos use them instead of downloading anything: `tiny_model()` returns a `LanguageModel`;
`save_tiny_model(path)` writes one to a directory that `load_model(path)` (and so the app) can open;
`running_app(env, log)` starts the real app in a subprocess on a free loopback port (browser, API, Space and
load tests, and benchmarks/bench_load.py).
"""

from __future__ import annotations

import inspect
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from explorer.models import LanguageModel, ModelInfo

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer(reverse: bool = False, mask: bool = False) -> object:
    """A character-level fast tokenizer over printable ASCII plus <unk>, <s> (bos) and </s> (eos). With
    `reverse`, the characters get their ids in the opposite order: the same texts, another vocabulary; with
    `mask`, a <mask> token last (for masked diffusion LMs)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [c for c in string.printable if c not in "\x0b\x0c\r"]
    if reverse:
        alphabet.reverse()
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet + (["<mask>"] if mask else []))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        **({"mask_token": "<mask>"} if mask else {}))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0, *, layers: int = 2, hidden: int = 64, model_id: str = "tiny-random-llama",
               scale: float = 1.0) -> LanguageModel:
    """A 2-layer Llama with random weights (deterministic per seed). `scale` sharpens its distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # weight initialisation only; decoding never touches the global RNG
    model = LlamaForCausalLM(config).eval()
    if scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = ModelInfo(model_id=model_id, weights_hash=f"seed:{seed}", dtype="float32", device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info)


_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512}
# Causal-LM families researchers bring, as (transformers config class, tiny settings). Sliding windows are set
# shorter than the test prompts so that the sliding layers really slide.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _LLAMA_LIKE),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": 12}),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_LLAMA_LIKE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    "mixtral": ("MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": ("Gemma2Config", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 12}),
    "gemma3_text": ("Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 12,
                                         "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "phi3": ("Phi3Config", _LLAMA_LIKE),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 512}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                                   "num_attention_heads": 4, "max_position_embeddings": 512}),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "max_position_embeddings": 512, "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "new_decoder_architecture": True, "num_kv_heads": 2}),
    "stablelm": ("StableLmConfig", _LLAMA_LIKE),
    "smollm3": ("SmolLM3Config", _LLAMA_LIKE),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE),
}


def tiny_architecture(name: str, seed: int = 0, scale: float = 8.0) -> LanguageModel:
    """A tiny randomly initialised causal LM of one of `ARCHITECTURES`, with the character tokenizer."""
    import transformers

    config_class, settings = ARCHITECTURES[name]
    tokenizer = tiny_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **settings)
    torch.manual_seed(seed)  # weight initialisation only
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)  # sharper distributions: well separated argmaxes
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = ModelInfo(model_id=f"tiny-random-{name}", weights_hash=f"{name}:seed:{seed}", dtype="float32",
                     device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info)


TOY_LETTERS = "abc"


def toy_model(seed: int = 0, *, layers: int = 2, scale: float = 8.0) -> LanguageModel:
    """A 2-layer Llama over a toy vocabulary: the three letters a, b, c and nothing else (no end token, so every
    run goes on to its budget). A run's first three tokens take 27 values, few enough to enumerate their exact
    probabilities (`explorer.check`); the model is still a real transformer with a KV cache, layers to skip and
    hidden states, so strategies that need those run on it. `scale` sets how peaked its distributions are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={letter: i for i, letter in enumerate(TOY_LETTERS)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    config = LlamaConfig(vocab_size=len(TOY_LETTERS), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)  # weight initialisation only
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = None
    info = ModelInfo(model_id="toy-abc-llama", weights_hash=f"toy:{layers}:seed:{seed}", dtype="float32",
                     device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info)


def save_retokenised_copy(lm: LanguageModel, path: str | Path) -> Path:
    """Save `lm` with the reversed tokenizer and its embedding and output rows moved to match: a model that
    computes exactly what `lm` computes, in another vocabulary (a draft with a different tokenizer that agrees
    with its target)."""
    path = Path(path)
    other = tiny_tokenizer(reverse=True)
    ours, theirs = lm.tokenizer.get_vocab(), other.get_vocab()
    order = torch.tensor([ours[token] for token, _ in sorted(theirs.items(), key=lambda item: item[1])])
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(lm.model.get_input_embeddings().weight[order])
        model.get_output_embeddings().weight.copy_(lm.model.get_output_embeddings().weight[order])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(other, key))
    model.generation_config.eos_token_id = other.eos_token_id
    model.generation_config.pad_token_id = other.pad_token_id
    model.save_pretrained(path)
    other.save_pretrained(path)
    return path


def save_tiny_model(path: str | Path, seed: int = 0, scale: float = 1.0) -> Path:
    path = Path(path)
    lm = tiny_model(seed, scale=scale)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def tiny_masked_lm(seed: int = 0, *, model_id: str = "tiny-random-modernbert") -> LanguageModel:
    """A 2-layer ModernBERT masked LM with random weights: a (bidirectional, unshifted) masked diffusion LM, as
    dllm-hub's ModernBERT chat models are."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from explorer.models import DiffusionInfo

    tokenizer = tiny_tokenizer(mask=True)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id, global_attn_every_n_layers=1,
    )
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(config).eval()
    info = ModelInfo(model_id=model_id, weights_hash=f"seed:{seed}", dtype="float32", device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info,
                         diffusion=DiffusionInfo(mask_id=tokenizer.mask_token_id, shift=False, bidirectional=True))


def tiny_a2d_model(seed: int = 0, *, layers: int = 2, scale: float = 8.0, model_id: str = "tiny-random-a2d-llama"
                   ) -> LanguageModel:
    """A tiny AR-to-diffusion model: a randomly initialised Llama (a causal architecture, with its KV cache API)
    whose attention sees every position unless told otherwise, as dllm's A2D models run their base model with an
    all-visible mask; the character tokenizer with <mask>; read as a masked diffusion LM (bidirectional, no shift,
    as dllm's MDLM sampler reads A2D models). `scale` sharpens its distributions."""
    from explorer.models import DiffusionInfo

    tokenizer = tiny_tokenizer(mask=True)
    torch.manual_seed(seed)  # weight initialisation only
    model = _a2d_class()(_tiny_llama_config(tokenizer, layers)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    info = ModelInfo(model_id=model_id, weights_hash=f"a2d:{layers}:seed:{seed}", dtype="float32", device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info,
                         diffusion=DiffusionInfo(mask_id=tokenizer.mask_token_id, shift=False, bidirectional=True))


def _tiny_llama_config(tokenizer: object, layers: int) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


_A2D: list[type] = []


def _a2d_class() -> type:
    """LlamaForCausalLM whose forward, given no 4-D mask, attends to every position (cached ones included)."""
    if not _A2D:
        from transformers import LlamaForCausalLM

        parent_keyword = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
            else "past_key_values"  # transformers 5.2x renamed past_key_values

        class TinyA2DLlama(LlamaForCausalLM):
            def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        cache: object = None, **kwargs: object) -> object:
                cache = cache if cache is not None else kwargs.pop("past_key_values", None)
                if attention_mask is None or attention_mask.dim() == 2:  # departure: padding masks are ignored
                    seen = cache.get_seq_length() if cache is not None else 0
                    batch, length = input_ids.shape
                    attention_mask = torch.zeros(batch, 1, length, seen + length, dtype=self.dtype,
                                                 device=input_ids.device)
                return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                       **{parent_keyword: cache}, **kwargs)

        _A2D.append(TinyA2DLlama)
    return _A2D[0]


def save_tiny_masked_lm(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    lm = tiny_masked_lm(seed)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def tiny_diffusion_gemma(seed: int = 0, *, canvas_length: int = 8, scale: float = 16.0,
                         model_id: str = "tiny-random-diffusion-gemma") -> LanguageModel:
    """A 2-layer DiffusionGemma (block diffusion: a causal encoder, a bidirectional decoder with self-conditioning,
    one sliding and one full attention layer, a 2-expert MoE, and the tiny vision tower its encoder always has)
    with random weights and the character tokenizer. `scale` multiplies the decoder's final norm (sharper canvas
    distributions; the encoder's K/V is unchanged)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from explorer.models import BLOCK_DIFFUSION

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1,
                moe_intermediate_size=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, patch_size=4, image_size=8)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  image_token_id=vocab + 1, boi_token_id=vocab + 2, eoi_token_id=vocab + 3)
    torch.manual_seed(seed)  # weight initialisation only
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        model.model.decoder.norm.weight.mul_(scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = ModelInfo(model_id=model_id, weights_hash=f"seed:{seed}", dtype="float32", device="cpu")
    return LanguageModel(model=model, tokenizer=tokenizer, info=info, diffusion=BLOCK_DIFFUSION)


def save_tiny_diffusion_gemma(path: str | Path, seed: int = 0, canvas_length: int = 8) -> Path:
    path = Path(path)
    lm = tiny_diffusion_gemma(seed, canvas_length=canvas_length)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ the app in a subprocess
APP_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(env: Mapping[str, str], log_path: Path, cwd: Path = APP_ROOT, start_s: float = 90.0) -> Iterator[str]:
    """Run app.py from `cwd` with `env` (plus a free GRADIO_SERVER_PORT on 127.0.0.1); yield its URL once it
    answers; stop it afterwards."""
    port = free_port()
    env = {**env, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + start_s
        try:
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if process.poll() is not None:
                        raise RuntimeError(f"the app exited: {log_path.read_text()[-3000:]}") from None
                    if time.time() > deadline:
                        raise RuntimeError(f"the app did not start within {start_s:g} s") from None
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
