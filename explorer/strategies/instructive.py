"""Instructive decoding (Kim et al. 2023, "Instructive Decoding: Instruction-Tuned Large Language Models are
Self-Refiners from Noisy Instructions", arXiv:2311.00233).

Each step contrasts the logits under the real instruction with those under a noisy one:
  ẑ_t = z_t(y | x, I) − ε · z_t(y | x, Ĩ),     y_t = argmax ẑ_t,
so tokens the model would also produce for a misleading instruction lose ground. Ĩ = "opposite" (the paper's
strongest noisy instruction: "Always respond with the opposite of what you're asked. You never get it right.")
or "null" (no instruction: the prompt's last token only, standing in for the paper's empty instruction);
ε = 0.3 as in the paper. Two KV sessions (the real and the noisy context) advance together; every step records
the raw distribution (rank = the chosen token's rank under the real instruction alone) and the contrasted one.

Departure: the noisy instruction is put before the whole prompt (chat template included) instead of rewriting
the user turn, because a strategy sees token ids, not the prompt text. So the real instruction stays in the
noisy context, where the authors' code (SniGenerator.inst_aware_batchify) replaces the task definition with the
noisy one. Their "none" instruction drops only the definition and keeps the task input; our "null" keeps only
the prompt's last token, so the input is gone as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

NOISY = ("opposite", "null")
OPPOSITE = "Always respond with the opposite of what you're asked. You never get it right.\n\n"


@dataclass(frozen=True)
class InstructiveConfig(Checked):
    epsilon: float = param(0.3, "ε: how much of the noisy instruction's logits is subtracted", minimum=0.0,
                           maximum=2.0, step=0.05)
    noisy: str = param("opposite", "the noisy instruction Ĩ", choices=NOISY)


def noisy_context(model: Any, prompt_ids: Sequence[int], noisy: str) -> list[int]:
    if noisy == "null":  # departure: the authors' "none" keeps the task input, dropping only the definition
        return list(prompt_ids[-1:])
    return list(model.tokenizer.encode(OPPOSITE, add_special_tokens=False)) + list(prompt_ids)


def contrast(real: torch.Tensor, noisy: torch.Tensor, epsilon: float) -> torch.Tensor:
    """ẑ = z − ε·z̃ over the vocabulary."""
    return real.float() - epsilon * noisy.float()


@register("instructive", InstructiveConfig, "contrast with a noisy ('opposite') instruction: z − ε·z̃",
          family="sampling", paper="Kim et al. 2023, Instructive Decoding, arXiv:2311.00233",
          reference_code=("joonkeekim/Instructive-Decoding: src/base_generator.py: Generator.inst_decode (noisy "
                          "inputs: src/sni_generator.py: SniGenerator.inst_aware_batchify)"),
          departures=(
              "the 'opposite' instruction is prepended to the whole prompt, so the real instruction stays in the "
              "noisy context; the authors' code replaces the task definition with it (meta-instruction + input)",
              "'null' keeps only the prompt's last token; the authors' 'none' drops only the definition and keeps "
              "the task input",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: InstructiveConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    real, noisy = model.session(), model.session()
    z = real.forward(list(prompt_ids), all_logits=False).logits[-1]  # (vocab,)
    z_noisy = noisy.forward(noisy_context(model, prompt_ids, config.noisy), all_logits=False).logits[-1]
    position = len(prompt_ids)
    for step in range(1_000_000):  # the runner stops it
        contrasted = contrast(z, z_noisy, config.epsilon)
        token = int(torch.argmax(contrasted))
        plain = int(torch.argmax(z))
        yield commit_token(model, step, position + step, token, z, contrasted,
                           details={"flipped": token != plain, "plain_top": plain})
        z, z_noisy = real.forward([token]).logits[-1], noisy.forward([token]).logits[-1]
