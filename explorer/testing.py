"""Tiny randomly initialised models with a real (character-level) tokenizer, built in code.

Tests and demos use them instead of downloading anything: `tiny_model()` returns a `LanguageModel`;
`save_tiny_model(path)` writes one to a directory that `load_model(path)` (and so the app) can open.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from explorer.models import LanguageModel, ModelInfo

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer() -> object:
    """A character-level fast tokenizer over printable ASCII plus <unk>, <s> (bos) and </s> (eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
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


def save_tiny_model(path: str | Path, seed: int = 0, scale: float = 1.0) -> Path:
    path = Path(path)
    lm = tiny_model(seed, scale=scale)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
