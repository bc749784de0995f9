"""A transformers `custom_generate` recipe written by the tests: a local directory whose
`custom_generate/generate.py` decodes greedily without a cache (one full pass per token), returning token ids only."""

from pathlib import Path

GREEDY_RECIPE = '''
import torch


def generate(model, input_ids, max_new_tokens=8, **kwargs):
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[:, -1, :]  # (batch, vocab)
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=-1)
    return ids
'''


def write_recipe(directory: Path, source: str = GREEDY_RECIPE) -> Path:
    (directory / "custom_generate").mkdir(parents=True, exist_ok=True)
    (directory / "custom_generate" / "generate.py").write_text(source, encoding="utf-8")
    return directory
