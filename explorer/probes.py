"""Optional per-step records that look inside the model: the logit lens and attention dependencies.

Both are off by default (`RunRequest.lens`, `RunRequest.attention`): they cost a second pass over the model per
token (a probe with its own KV cache follows the committed tokens, whatever strategy made them, so that every
strategy gets them with no change), plus, for the lens, the LM head once per layer, and for attention, eager
attention (the only kind that returns its weights). With both off the runner does nothing extra.

At step k the probe holds the states of the position that predicted token k (the last context position):
  - lens: for each layer l, softmax(LM_head(norm(h_l))) (the last layer: the model's output itself), the
    chosen token's probability and rank under it, and its top 5;
  - attention: that query's attention weights over earlier positions, averaged over heads and over the chosen
    layer range, the `top` largest kept.
"""

from __future__ import annotations

from typing import Any

import torch

from explorer.events import AttentionStep, LensStep, TokenStep
from explorer.models import final_norm

LENS_TOP = 5
MAX_ATTENTION_TOP = 64


def parse_layer_range(text: str | None, layers: int) -> tuple[int, int]:
    """'3-7' (inclusive, 0-based), '5', or empty (every layer) -> (first, last); ValueError naming the range."""
    if text is None or not str(text).strip():
        return 0, layers - 1
    first, _, last = str(text).strip().partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"attention layers must read like 0-{layers - 1} or 5, not {text!r}") from None
    if not 0 <= lo <= hi < layers:
        raise ValueError(f"attention layers must lie within 0-{layers - 1} (this model has {layers} layers)")
    return lo, hi


class Probe:
    """Follows a run's committed tokens with its own cache and records LensStep / AttentionStep events."""

    def __init__(self, model: Any, prompt_ids: list[int], *, lens: bool, attention: bool,
                 layers: tuple[int, int], top: int):
        if not 1 <= top <= MAX_ATTENTION_TOP:
            raise ValueError(f"attention top must be between 1 and {MAX_ATTENTION_TOP}")
        self.model = model.for_run()  # its passes are not the run's
        self.lens, self.attention, self.layers, self.top = lens, attention, layers, top
        self.session = self.model.session()
        self._norm = final_norm(self.model.model) if lens else None
        self._head = self.model.model.get_output_embeddings() if lens else None
        self._sequence = list(prompt_ids)  # every position's token, for the attended tokens' texts
        self._feed(prompt_ids)

    @torch.inference_mode()
    def _feed(self, token_ids: list[int]) -> None:
        out = self.session.forward(token_ids, all_logits=False, hidden_states=self.lens, attentions=self.attention)
        if self.lens:
            self._logits, self._hidden = out.logits[-1], out.hidden[1:, -1]  # (vocab,), (layers, hidden)
        if self.attention:
            self._weights = out.attentions[:, :, -1]  # (layers, heads, kv)

    def observe(self, step: TokenStep) -> list[Any]:
        """The records of `step` (from the states before it), then the probe takes the token in."""
        events: list[Any] = []
        if self.lens:
            events.append(self._lens_step(step))
        if self.attention:
            events.append(self._attention_step(step))
        self._feed([step.token_id])
        self._sequence.append(step.token_id)
        return events

    @torch.inference_mode()
    def _lens_step(self, step: TokenStep) -> LensStep:
        hidden = self._hidden[:-1]
        logits = self._head(self._norm(hidden)).float() if len(hidden) else self._logits[None][:0]
        logp = torch.log_softmax(torch.cat([logits, self._logits[None].float()]), dim=-1)  # (layers, vocab)
        chosen = logp[:, step.token_id]
        ranks = (logp > chosen[:, None]).sum(dim=-1)
        top = torch.topk(logp, min(LENS_TOP, logp.shape[-1]), dim=-1)
        layers = logp.shape[0]
        packed = torch.cat([chosen.exp().double(), ranks.double(), top.values.exp().double().reshape(-1),
                            top.indices.double().reshape(-1)]).tolist()  # one transfer
        k = top.indices.shape[-1]
        probs, rank_list = packed[:layers], [int(r) for r in packed[layers:2 * layers]]
        values = packed[2 * layers:2 * layers + layers * k]
        ids = [int(i) for i in packed[2 * layers + layers * k:]]
        top_ids = [ids[i * k:(i + 1) * k] for i in range(layers)]
        return LensStep(step=step.step, position=step.position, token_id=step.token_id, chosen_probs=probs,
                        chosen_ranks=rank_list, top_ids=top_ids,
                        top_probs=[values[i * k:(i + 1) * k] for i in range(layers)],
                        top_texts=[[self.model.piece(t) for t in row] for row in top_ids])

    @torch.inference_mode()
    def _attention_step(self, step: TokenStep) -> AttentionStep:
        first, last = self.layers
        weights = self._weights[first:last + 1].float().mean(dim=(0, 1))  # (kv,): a distribution
        top = torch.topk(weights, min(self.top, weights.shape[-1]))
        packed = torch.cat([top.values.double(), top.indices.double()]).tolist()
        k = top.values.shape[-1]
        sources = [int(i) for i in packed[k:]]
        return AttentionStep(step=step.step, position=step.position, token_id=step.token_id, first_layer=first,
                             last_layer=last, sources=sources, weights=packed[:k],
                             source_texts=[self.model.piece(self._sequence[i]) for i in sources])
