"""What a server (the app, a public Space) lets its visitors ask for: per-request limits, the models it may load,
and whether visitors see each other's runs (the `Viewer` a request gets: `ServerPolicy.viewer`; the rule itself is in
explorer/viewer.py). Set by the operator through the environment; checked here, before anything runs.

Environment: DECODING_EXPLORER_MAX_NEW_TOKENS (512), DECODING_EXPLORER_MAX_PROMPT_TOKENS (2048),
DECODING_EXPLORER_TIME_LIMIT_S (300: compute seconds per run; a run past it is stopped and stored as
"stopped"), DECODING_EXPLORER_ALLOWED_MODELS (comma-separated; default: the embedded model and the default
model, and the small diffusion LM a Space preloads, DIFFUSION_DEMO_HUB_ID, where it is in the local Hugging Face cache),
DECODING_EXPLORER_ALLOW_ANY_MODEL (1: any Hugging Face Hub id too, never a local path),
DECODING_EXPLORER_MAX_MODEL_GB (2: weight size a Hub id may have, read from the Hub before downloading),
DECODING_EXPLORER_PUBLIC_GALLERY (1: everyone's runs are listed in History; default 1 locally, 0 on a Space),
DECODING_EXPLORER_MAX_TREE_NODES (128, the hard ceiling: draft nodes verified per round),
DECODING_EXPLORER_MAX_LANES (4: lanes per Run), DECODING_EXPLORER_MAX_BEAMS (16: beams of a beam search),
DECODING_EXPLORER_MAX_RUNS_PER_VISITOR (1: Runs and API calls one visitor may have going at once; 0 = no limit),
DECODING_EXPLORER_MAX_SEEDS (5: runs of each lane's config with successive seeds, for mean and interval).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from explorer.draft_source import DraftSource
from explorer.params import MAX_TREE_NODES
from explorer.request import MAX_NEW_TOKENS_LIMIT, RunRequest
from explorer.viewer import Viewer

MAX_LANES = 4  # lanes the page has
MAX_BEAMS = 16  # the beam strategies' own ceiling
MAX_SEEDS = 10  # the page's ceiling on seeds per lane
_RUNNING: dict[str, int] = {}  # visitor -> runs going now (the app's Run and API calls)
_RUNNING_LOCK = threading.Lock()
# A small public masked diffusion LM (a ModernBERT-base fine-tuned to chat by MDLM, 0.2 B parameters, from the
# dllm project) that the Space preloads beside the embedded model (README front matter: preload_from_hub), so a
# visitor sees real unmasking; allowed by default wherever it is already in the Hugging Face cache.
DIFFUSION_DEMO_HUB_ID = "dllm-hub/ModernBERT-base-chat-v0.1"
EMBEDDED_NAMES = ("embedded", "default", "", "embedded:SmolLM2-135M-Instruct")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def hub_weight_bytes(model_id: str) -> int:
    """The size of a Hub model's weight files, from the Hub's metadata (nothing is downloaded)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(model_id, files_metadata=True)
    return sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith((".safetensors", ".bin")))


def in_hub_cache(model_id: str) -> bool:
    """Whether a Hub model is in the local Hugging Face cache (a Space's preload_from_hub). Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_files_only=True)
        return True
    except Exception:  # not in the cache (LocalEntryNotFoundError), no huggingface_hub, ...
        return False


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServerPolicy:
    max_new_tokens: int = 512
    max_prompt_tokens: int = 2048
    time_limit_s: float = 300.0
    max_tree_nodes: int = MAX_TREE_NODES
    allowed_models: tuple[str, ...] = ("embedded",)
    allow_any_model: bool = False
    max_model_bytes: int = 2 * 10**9
    public_gallery: bool = True
    shared_state: bool = True  # may a run see state other runs left (Token Recycling's keep_table)?
    max_lanes: int = MAX_LANES
    max_beams: int = MAX_BEAMS
    max_runs_per_visitor: int = 1
    max_seeds: int = 5
    weight_bytes: Callable[[str], int] = hub_weight_bytes

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, default_model: str = "embedded") -> ServerPolicy:
        try:
            allowed = env.get("DECODING_EXPLORER_ALLOWED_MODELS")
            models = [m.strip() for m in allowed.split(",")] if allowed else ["embedded", default_model] + (
                [DIFFUSION_DEMO_HUB_ID] if in_hub_cache(DIFFUSION_DEMO_HUB_ID) else [])
            return cls(
                max_new_tokens=min(int(env.get("DECODING_EXPLORER_MAX_NEW_TOKENS", "512")), MAX_NEW_TOKENS_LIMIT),
                max_prompt_tokens=int(env.get("DECODING_EXPLORER_MAX_PROMPT_TOKENS", "2048")),
                time_limit_s=float(env.get("DECODING_EXPLORER_TIME_LIMIT_S", "300")),
                max_tree_nodes=min(int(env.get("DECODING_EXPLORER_MAX_TREE_NODES", str(MAX_TREE_NODES))),
                                   MAX_TREE_NODES),
                allowed_models=tuple(dict.fromkeys(_canonical(m) for m in models)),
                allow_any_model=_flag(env, "DECODING_EXPLORER_ALLOW_ANY_MODEL", False),
                max_model_bytes=int(float(env.get("DECODING_EXPLORER_MAX_MODEL_GB", "2")) * 10**9),
                public_gallery=_flag(env, "DECODING_EXPLORER_PUBLIC_GALLERY", "SPACE_ID" not in env),
                shared_state=_flag(env, "DECODING_EXPLORER_SHARED_STATE", "SPACE_ID" not in env),
                max_lanes=max(1, min(int(env.get("DECODING_EXPLORER_MAX_LANES", str(MAX_LANES))), MAX_LANES)),
                max_beams=max(1, min(int(env.get("DECODING_EXPLORER_MAX_BEAMS", str(MAX_BEAMS))), MAX_BEAMS)),
                max_runs_per_visitor=max(0, int(env.get("DECODING_EXPLORER_MAX_RUNS_PER_VISITOR", "1"))),
                max_seeds=max(1, min(int(env.get("DECODING_EXPLORER_MAX_SEEDS", "5")), MAX_SEEDS)),
            )
        except ValueError as error:
            raise ValueError(f"a DECODING_EXPLORER_* setting is not a number: {error}") from None

    def check_model(self, model_id: str | None) -> str:
        """The model id to load, or ValueError: the same words for every refused id or path, so that the
        answer says nothing about what exists on the server."""
        name = _canonical(model_id or "")
        if name in self.allowed_models:
            return name
        if self.allow_any_model and HUB_ID.fullmatch(name) and not name.startswith((".", "/")):
            try:
                size = self.weight_bytes(name)
            except Exception:  # not on the Hub, no network, ...: refused like any other
                size = None
            if size is not None and 0 < size <= self.max_model_bytes:
                return name
        raise ValueError(f"this server does not load that model: choose one of {', '.join(self.allowed_models)}")

    def may_offer(self, model_id: str) -> bool:
        """Whether the app may list this model as a choice (no network: size limits are checked on use)."""
        name = _canonical(model_id)
        return name in self.allowed_models or bool(self.allow_any_model and HUB_ID.fullmatch(name))

    def limit(self, request: RunRequest) -> RunRequest:
        """The request with this server's limits applied, its model fields (draft models) checked."""
        if request.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max new tokens must be between 1 and {self.max_new_tokens} here")
        beams = getattr(request.config, "num_beams", 0)
        if beams > self.max_beams:
            raise ValueError(f"num_beams must be at most {self.max_beams} here")
        nodes = request.config.draft_nodes()
        if nodes > self.max_tree_nodes:
            raise ValueError(f"these settings draft {nodes} nodes per round; the limit here "
                             f"is {self.max_tree_nodes}: use a smaller tree")
        for spec in dataclasses.fields(request.config):
            value = getattr(request.config, spec.name)
            if spec.metadata.get("model") and not DraftSource.parse(value).builtin:
                self.check_model(value)
            if spec.metadata.get("runs_code") and value:
                raise ValueError(f"{spec.name} names code to run (a custom_generate recipe): that runs only from the "
                                 "CLI or Python, never on a server")
            if spec.metadata.get("crosses_runs") and value and not self.shared_state:
                raise ValueError(f"{spec.name} would let this run see what other visitors' runs left behind: it is "
                                 "off on this server")
        return request.replace(max_prompt_tokens=self.max_prompt_tokens, time_limit_s=self.time_limit_s)

    def viewer(self, owner: str, shared: Iterable[str] = ()) -> Viewer:
        """The `Viewer` of a request from `owner`, with the runs `shared` with it, under this server's gallery."""
        return Viewer(owner, frozenset(shared), gallery=self.public_gallery)

    def check_lanes(self, count: int) -> None:
        if count > self.max_lanes:
            raise ValueError(f"at most {self.max_lanes} lanes run at once here: remove a lane")

    def check_seeds(self, seeds: Any) -> int:
        """Runs per lane (the lane's config with seeds s, s + 1, ...): a whole number from 1 to max_seeds."""
        try:
            count = int(seeds if seeds is not None else 1)
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= self.max_seeds or (isinstance(seeds, float) and not seeds.is_integer()):
            raise ValueError(f"seeds per lane must be a whole number from 1 to {self.max_seeds} here")
        return count

    @contextmanager
    def visitor_run(self, visitor: str):
        """Hold one of the visitor's concurrent-run slots while the block runs; ValueError when none is free."""
        with _RUNNING_LOCK:
            if self.max_runs_per_visitor and _RUNNING.get(visitor, 0) >= self.max_runs_per_visitor:
                raise ValueError("you have a run going already: wait for it or press Stop"
                                 if self.max_runs_per_visitor == 1 else
                                 f"you have {self.max_runs_per_visitor} runs going already: wait for one to end")
            _RUNNING[visitor] = _RUNNING.get(visitor, 0) + 1
        try:
            yield
        finally:
            with _RUNNING_LOCK:
                _RUNNING[visitor] -= 1
                if not _RUNNING[visitor]:
                    del _RUNNING[visitor]

    def describe(self) -> str:
        any_model = f", or any Hub model under {self.max_model_bytes / 1e9:g} GB" if self.allow_any_model else ""
        runs = (f"; {self.max_runs_per_visitor} run{'s' if self.max_runs_per_visitor > 1 else ''} at a time per "
                "visitor" if self.max_runs_per_visitor else "")
        return (f"Limits here: prompts up to {self.max_prompt_tokens} tokens, up to {self.max_new_tokens} new tokens "
                f"and {self.time_limit_s:g} s of compute per run, up to {self.max_lanes} lanes, "
                f"{self.max_beams} beams, draft trees up to {self.max_tree_nodes} nodes, {self.max_seeds} seeds per "
                f"lane{runs}; "
                f"models: {', '.join(self.allowed_models)}{any_model}; "
                + ("History lists everyone's runs." if self.public_gallery else
                   "History lists your runs and the ones shared with you by permalink."))


def _canonical(model_id: str) -> str:
    name = model_id.strip()
    return "embedded" if name in EMBEDDED_NAMES else name
