"""Language models for step-wise decoding, one room per concern, imported downward in this order:

- `arch`: per-architecture plumbing (`layer_path`, `decoder_layers`, `decoder_owner`, `final_norm`,
  `cache_kwarg`, `eager_attention`);
- `masks`: tree attention masks (`ancestor_mask`, `sliding_window`, `tree_attention_mask(s)`);
- `lm`: `LanguageModel`, its `KVSession` (every forward variant returns one `Pass`) and the tree-support probe;
- `canvas`: a diffusion canvas's stored K/V (`CanvasKV`) and its probe;
- `loading`: `load_model`, the embedded GGUF, `ModelCache`, `warm_up`, tokenizer checks.

`from explorer.models import X` reaches every public name. A test that patches a name patches it where it is
read (e.g. `explorer.models.loading.load_model` for `ModelCache`).
"""

from explorer.models.arch import cache_kwarg, decoder_layers, decoder_owner, eager_attention, final_norm, layer_path
from explorer.models.canvas import CanvasKV
from explorer.models.lm import (
    BLOCK_DIFFUSION,
    BLOCK_DIFFUSION_ARCHITECTURES,
    DIFFUSION_ARCHITECTURES,
    DiffusionInfo,
    KVSession,
    LanguageModel,
    ModelInfo,
    Pass,
    check_tree_support,
)
from explorer.models.loading import (
    DTYPES,
    EMBEDDED_ALIASES,
    EMBEDDED_GGUF,
    EMBEDDED_HUB_ID,
    EMBEDDED_MODEL_ID,
    EMBEDDED_PACKAGE,
    INSTALL_HINT,
    MODEL_CACHE,
    ModelCache,
    check_same_vocabulary,
    embedded_gguf_path,
    ensure_embedded_model,
    load_model,
    preloaded_embedded,
    resolve_device,
    resolve_dtype,
    same_tokenizer,
    tokenizer_merges,
    warm_up,
)
from explorer.models.masks import ancestor_mask, sliding_window, tree_attention_mask, tree_attention_masks

__all__ = [
    "BLOCK_DIFFUSION", "BLOCK_DIFFUSION_ARCHITECTURES", "DIFFUSION_ARCHITECTURES", "DTYPES", "EMBEDDED_ALIASES",
    "EMBEDDED_GGUF", "EMBEDDED_HUB_ID", "EMBEDDED_MODEL_ID", "EMBEDDED_PACKAGE", "INSTALL_HINT", "MODEL_CACHE",
    "CanvasKV", "DiffusionInfo", "KVSession", "LanguageModel", "ModelCache", "ModelInfo", "Pass", "ancestor_mask",
    "cache_kwarg", "check_same_vocabulary", "check_tree_support", "decoder_layers", "decoder_owner",
    "eager_attention", "embedded_gguf_path", "ensure_embedded_model", "final_norm", "layer_path", "load_model",
    "preloaded_embedded", "resolve_device", "resolve_dtype", "same_tokenizer", "sliding_window", "tokenizer_merges",
    "tree_attention_mask", "tree_attention_masks", "warm_up",
]
