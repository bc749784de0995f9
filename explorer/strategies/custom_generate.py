"""A transformers `custom_generate` recipe as a lane: a local directory with `custom_generate/generate.py`, run by
transformers' own loader (`model.generate(custom_generate=DIR, trust_remote_code=True)`, which imports that file and
calls its `generate(model, input_ids, ...)`), recorded as a run.

No paper: whatever the recipe implements. Its code runs as you, so the lane runs only with `trust_remote_code`
switched on, from a local directory or, where the Hugging Face Hub is reachable, a Hub repository id (its
`custom_generate/` folder is fetched first, so an unreachable Hub fails in one line before the run is stored), and
never on a server (explorer/serving.py refuses a `runs_code` field). What it committed is recorded by
explorer/strategies/generate_tap.py: the forward passes it made, the rounds of any candidate generator it used, and
per step the scores it returned or, when it returns only token ids, the raw logits of one pass of the model over
prompt + output.
Departures: the recipe decodes in one call, so its tokens arrive at the end, not as they are made; the runner still
stops at the end token, stop strings and the token budget (passed as `max_new_tokens`). A recipe that samples draws
from torch's global generator: it is seeded from the run's seed inside `torch.random.fork_rng`, so the run is
reproducible and the global state is left as it was.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, one_line, param
from explorer.strategies.base import register
from explorer.strategies.generate_tap import GenerateTap, generate_events

RECIPE_FILE = Path("custom_generate") / "generate.py"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


@functools.lru_cache(maxsize=8)
def fetch_recipe(repo_id: str) -> Path:
    """The local folder of a Hub repository's `custom_generate/` (downloaded once into the Hub cache, looked up
    once per process: `prepare` and the run share it)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=["custom_generate/*"]))


def recipe_dir(repo: str) -> Path:
    """The local directory that holds the recipe: `repo` itself, or a Hub id's fetched copy."""
    local = Path(repo).expanduser()
    if repo and (local / RECIPE_FILE).is_file():
        return local
    if repo and not local.exists() and HUB_ID.fullmatch(repo):
        try:
            fetched = fetch_recipe(repo)
        except Exception as error:  # offline, unknown repo, no access: one line, nothing stored
            raise ValueError(f"cannot fetch the recipe {repo!r} from the Hugging Face Hub: {one_line(error)}"
                             ) from None
        if (fetched / RECIPE_FILE).is_file():
            return fetched
        raise ValueError(f"the Hub repository {repo!r} has no {RECIPE_FILE.as_posix()}")
    raise ValueError(f"repo must be a local directory holding {RECIPE_FILE.as_posix()} or a Hub id (owner/name)")


@dataclass(frozen=True)
class CustomGenerateConfig(Checked):
    repo: str = param("", "a local directory holding custom_generate/generate.py, or a Hub id where the Hub is "
                          "reachable (its code runs as you)", runs_code=True)
    trust_remote_code: bool = param(False, "run that directory's code: required, as transformers requires it")


def prepare(model: Any, config: CustomGenerateConfig) -> None:
    """Refuse, before the run is stored, a recipe that is not trusted, or neither a local directory with the file
    nor a Hub repository that can be fetched."""
    trusted_recipe(config)


def trusted_recipe(config: CustomGenerateConfig) -> Path:
    """The recipe's local directory, once trust is switched on; ValueError otherwise."""
    if not config.trust_remote_code:
        raise ValueError("custom_generate runs the directory's own code: switch trust_remote_code on if you trust it")
    return recipe_dir(config.repo)


@register("custom_generate", CustomGenerateConfig,
          "a transformers custom_generate recipe from a local directory (trust_remote_code), recorded",
          needs_budget=True, prepare=prepare, family="other",
          paper="none: the recipe's own (transformers' custom_generate mechanism runs it)",
          reference_code=("huggingface/transformers: src/transformers/generation/utils.py: "
                          "GenerationMixin.generate (custom_generate), GenerationMixin.load_custom_generate"),
          departures=("the recipe decodes in one call: its tokens are recorded when it returns, not as they are made",
                      "a recipe that returns only token ids gets its per-step scores from one pass of the model over "
                      "prompt + output (the raw logits), not from its own loop"))
def run(model: Any, prompt_ids: Sequence[int], config: CustomGenerateConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    recipe = trusted_recipe(config)
    ids = torch.tensor([list(prompt_ids)], device=model.device)  # (1, prompt)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device))
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), GenerateTap(model.model) as tap:
        torch.manual_seed(seed)  # inside fork_rng: the recipe's draws follow the run's seed, the global state returns
        output = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      custom_generate=str(recipe), trust_remote_code=True)
    model.forward_passes += tap.forward_passes
    events, _ = generate_events(model, output, ids.shape[1], prompt_ids, tap.rounds, model.eos_token_ids)
    yield from events
