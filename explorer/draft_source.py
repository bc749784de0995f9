"""Where a run's draft comes from, parsed once from the text a lane, the CLI or a stored config gives: a ground-floor
module (it imports nothing from the project), so that heads, draft models, strategies and the server policy read
one typed value instead of comparing sentinel strings of their own.

Kinds: 'target' (the target drafts for itself: accepts everything, saves nothing), 'layer-skip' (the target minus
its middle quarter of layers), 'eagle-head' (the EAGLE head shipped for the target), 'auto' (the best drafter
that comes with the target: its shipped head, else layer-skip) and 'model' (an HF id or local path: a separate
draft model, or a trained head's directory). Every kind but 'model' comes with the target, so a public server
never loads anything a visitor names for it.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET, LAYER_SKIP, EAGLE_HEAD, AUTO, MODEL = "target", "layer-skip", "eagle-head", "auto", "model"
BUILTIN = (TARGET, LAYER_SKIP, EAGLE_HEAD, AUTO)  # drafts that come with the target


@dataclass(frozen=True)
class DraftSource:
    kind: str  # TARGET, LAYER_SKIP, EAGLE_HEAD, AUTO or MODEL
    name: str = ""  # MODEL: the HF id or local path

    @classmethod
    def parse(cls, text: str | None, empty: str = TARGET) -> DraftSource:
        """The source `text` names; an empty text means `empty` (a draft model field: the target; a head field:
        the shipped head)."""
        value = (text or "").strip()
        if not value:
            return cls(empty)
        return cls(value) if value in BUILTIN else cls(MODEL, value)

    @property
    def builtin(self) -> bool:
        """Whether the draft comes with the target (nothing is loaded from a name)."""
        return self.kind != MODEL

    def __str__(self) -> str:
        return self.name if self.kind == MODEL else self.kind
