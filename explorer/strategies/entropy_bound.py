"""Entropy-bounded block diffusion, as DiffusionGemma's own `generate` runs it (transformers 5.x,
src/transformers/models/diffusion_gemma/generation_diffusion_gemma.py: `DiffusionGemmaGenerationMixin.generate`,
`_denoising_step`, `EntropyBoundSampler.initialize_canvas / accept_canvas / renoise_canvas`,
`LinearTemperatureScheduleLogitsProcessor`, `StableAndConfidentStoppingCriteria`). The acceptance rule is the
EB-Sampler's (Ben-Hamu, Gat, Severo, Nolte, Karrer 2025, "Accelerated Sampling from Masked Diffusion Models via
Entropy Bounded Unmasking", arXiv:2505.24857, which transformers cites).

Notation: L = canvas length (the block; DiffusionGemma's `config.canvas_length`), N = max_denoising_steps, V = the
vocabulary, γ = entropy_bound. The output is made canvas by canvas, left to right (block autoregressive):

1. The encoder appends the prompt (then each finished canvas) to its K/V cache.
2. x_T ~ U(V)^L: the canvas starts as uniformly random tokens (not [MASK]s).
3. For n = N, N−1, ..., 1 (transformers counts the steps down):
   a. the decoder reads x_t (bidirectionally, over the cache) with the previous step's tempered logits as
      self-conditioning (none at the first step) -> logits l;
   b. l' = l / T_n, T_n = t_min + (t_max − t_min)·n/N (hot first, cooler later);
   c. x_D ~ softmax(l') per position (the denoiser's sample); x̂ = argmax l' (the draft);
   d. accept: sort the positions by H_i = H(softmax l'_i) ascending and take the longest prefix with
      Σ_{j ≤ k} H_j − H_k ≤ γ (the EB bound on the mutual information of the accepted tokens; the first one is
      always taken); accepted positions take x_D, the others keep x_t;
   e. renoise: every position not accepted gets a fresh uniform token -> x_{t−1};
   f. stop when x̂ has not changed for `stability_threshold` steps and the mean H_i < `confidence_threshold`.
4. The canvas's output is the last x̂ (not the accepted samples); stop at an end token or the budget.

Randomness: transformers draws x_T, x_D and the renoising from torch's global generator; here the same three
calls, in the same order, take the run's seeded `torch.Generator`, so a run with seed s is token-identical to
`torch.manual_seed(s); model.generate(...)` with the same settings (tests/test_entropy_bound.py).

Recorded: an UnmaskStep per denoising step over the canvas's positions (`masked` = every position of the
canvas, all open until it ends): x̂ (`predicted_ids`), −H_i (`confidences`: the rule ranks by it), the top-1 −
top-2 margin, H_i, and `scores` = Σ_{j ≤ rank(i)} H_j − H_i (the left side of the bound); `committed` = the
positions accepted this step with their samples x_D, `remasked` = those renoised. The canvas's last step commits
x̂ everywhere (`all_in`); then a TokenStep per position in order (origin "denoised", raw logits l and the tempered
l' it was chosen from). Forward passes count the decoder's passes, as transformers' `tokens_per_forward` does
(not the encoder's one pass over each finished canvas).

Departures (also in the registry below): generate keeps whole canvases (past max_new_tokens, padded after an end
token), the runner stops inside one; the settings are this strategy's (transformers' defaults), a checkpoint's
generation_config.json is not read; text prompts only, batch 1; on a model other than DiffusionGemma (a causal or
masked LM read as a canvas) there is no self-conditioning and no encoder cache: every step is one full pass over
prompt, finished canvases and canvas. From the paper (as in transformers): a canvas of random tokens, renoised
where not accepted at every step, where the EB-Sampler unmasks [MASK]s for good; the temperature schedule and the
adaptive stop are DiffusionGemma's generate's, not the paper's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, UnmaskStep
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

PLAIN_CANVAS_LENGTH = 32  # the canvas on a model that has none of its own


@dataclass(frozen=True)
class EntropyBoundConfig(Checked):
    # Departure: transformers' global defaults (`_get_default_generation_params`); a checkpoint's own
    # generation_config.json, which `generate` would read, is not.
    max_denoising_steps: int = param(48, "N: denoising steps per canvas at most", minimum=1, maximum=1024, step=1)
    entropy_bound: float = param(0.1, "γ: accept the lowest-entropy samples while ΣH − max H ≤ γ (larger: more "
                                      "tokens per step)", minimum=0.0, maximum=100.0, step=0.01)
    t_min: float = param(0.4, "temperature at the last step (the schedule falls linearly from t_max)", minimum=0.0,
                         maximum=4.0, step=0.05)
    t_max: float = param(0.8, "temperature at the first step", minimum=0.0, maximum=4.0, step=0.05)
    stability_threshold: int = param(1, "stop a canvas once its argmax has not changed for this many steps "
                                        "(and it is confident)", minimum=0, maximum=1024, step=1)
    confidence_threshold: float = param(0.005, "... and the mean entropy (nats) of its tempered distributions is "
                                               "below this", minimum=0.0, maximum=20.0, step=0.001)
    canvas_length: int = param(0, "tokens per canvas (block); 0: the model's own (DiffusionGemma's canvas_length, "
                                  f"{PLAIN_CANVAS_LENGTH} on other models)", minimum=0, maximum=2048, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_bound <= 0:
            raise ValueError("entropy_bound must be > 0 (the first token of a step is accepted whatever it is)")
        if self.confidence_threshold <= 0:
            raise ValueError("confidence_threshold must be > 0")
        if self.t_max <= self.t_min:
            raise ValueError("the temperature falls from t_max to t_min: need t_max > t_min")


# ------------------------------------------------------------------------------------------- the math
def step_temperature(config: EntropyBoundConfig, remaining: int, device: torch.device) -> torch.Tensor:
    """T_n = t_min + (t_max − t_min)·n/N, n = steps remaining (N at the first step), as transformers computes it:
    an int32 step tensor, so that l / T_n rounds exactly as there."""
    step = torch.tensor(remaining, dtype=torch.int32, device=device)
    return config.t_min + (config.t_max - config.t_min) * (step / config.max_denoising_steps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H per position, in nats, of `logits` (..., vocab), computed as transformers does (Categorical)."""
    return torch.distributions.Categorical(logits=logits).entropy()


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EB-Sampler: with the positions sorted by H ascending, accept the prefix where Σ_{j ≤ k} H_j − H_k ≤ γ
    (H_k is the prefix's maximum). `entropy` (..., L) -> (accepted bool (..., L), the left side per position)."""
    ordered, order = torch.sort(entropy, dim=-1, descending=False)
    load = torch.cumsum(ordered, dim=-1) - ordered  # (..., L) in sorted order
    accepted = torch.scatter(torch.zeros_like(load, dtype=torch.bool), -1, order, load <= bound)
    return accepted, torch.scatter(torch.zeros_like(load), -1, order, load)


def stable_and_confident(history: deque, draft: torch.Tensor, entropy: torch.Tensor, threshold: float) -> bool:
    """Adaptive stop: the draft x̂ equals each of the last `history.maxlen` drafts, and mean H < threshold. Adds
    the draft to `history` (a window of length stability_threshold; 0: always stable)."""
    stable = len(history) == history.maxlen and all(torch.equal(past, draft) for past in history)
    history.append(draft)
    return stable and bool(entropy.mean(dim=-1) < threshold)  # a tensor comparison, as transformers makes it


# ------------------------------------------------------------------------------------------- the readers
class GemmaCanvas:
    """DiffusionGemma's passes as its `generate` makes them: the encoder appends tokens to a DynamicCache (causal,
    positions continuing), the decoder reads a canvas over that cache with self-conditioning logits."""

    def __init__(self, lm: Any):
        from transformers import DynamicCache

        self.lm, self.net = lm, lm.model
        self.cache = DynamicCache(config=self.net.config.get_text_config(decoder=True))
        self.encoded = 0
        self.conditioning_dtype = self.net.model.decoder.embed_tokens.weight.dtype

    def encode(self, token_ids: Sequence[int]) -> None:
        # departure: text only (no pixel_values) and one sequence, so the 2-D mask is all ones
        device = self.lm.device
        ids = torch.tensor([list(token_ids)], device=device)
        positions = torch.arange(self.encoded, self.encoded + ids.shape[1], dtype=torch.int32, device=device)[None]
        self.encoded += ids.shape[1]
        seen = torch.ones((1, self.encoded), dtype=torch.bool, device=device)  # no padding
        with torch.no_grad():
            self.net.model.encoder(input_ids=ids, attention_mask=seen, cache=self.cache, position_ids=positions)

    def logits(self, canvas: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """Raw logits `(1, L, vocab)` (float32, soft-capped) of the canvas `(1, L)`."""
        positions = torch.arange(self.encoded, self.encoded + canvas.shape[1], dtype=torch.int32,
                                 device=canvas.device)[None]
        if conditioning is not None:
            conditioning = conditioning.to(self.conditioning_dtype)
        with torch.no_grad():
            out = self.net(decoder_input_ids=canvas, self_conditioning_logits=conditioning, cache=self.cache,
                           decoder_position_ids=positions)
        self.lm.forward_passes += 1
        return out.logits


class PlainCanvas:
    """Any other model: prompt, finished canvases and the canvas in one full pass (`canvas_logits`); departure:
    no self-conditioning, no encoder cache."""

    def __init__(self, lm: Any):
        self.lm, self.context = lm, []

    def encode(self, token_ids: Sequence[int]) -> None:
        self.context += list(token_ids)

    def logits(self, canvas: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        return self.lm.canvas_logits(self.context + canvas[0].tolist(), last=canvas.shape[1])[None]


# ------------------------------------------------------------------------------------------- the sampler
@register("entropy_bound", EntropyBoundConfig,
          "diffusion, DiffusionGemma's sampler: a canvas of random tokens; each step keeps the lowest-entropy "
          "samples under a bound and renoises the rest, until the argmax is stable and confident",
          needs_budget=True, family="diffusion",
          paper="Ben-Hamu et al. 2025, Accelerated Sampling from Masked Diffusion Models via Entropy Bounded "
                "Unmasking, arXiv:2505.24857",
          reference_code="huggingface/transformers: src/transformers/models/diffusion_gemma/"
                         "generation_diffusion_gemma.py: DiffusionGemmaGenerationMixin.generate, _denoising_step, "
                         "EntropyBoundSampler, StableAndConfidentStoppingCriteria",
          departures=(
              "generate keeps whole canvases (past max_new_tokens, padded after an end token); the runner stops "
              "inside the last one, at max_new_tokens or the end token (the tokens up to there are identical)",
              "the settings are this strategy's parameters with transformers' defaults (N = 48, γ = 0.1, T 0.8 -> "
              "0.4, stable 1 step, mean entropy < 0.005); a checkpoint's own generation_config.json is not read",
              "text prompts only (no pixel_values), one sequence (generate takes a batch)",
              "on a model other than DiffusionGemma (a causal or masked LM read as a canvas) there is no "
              "self-conditioning and no encoder cache: each step is one full pass over prompt and canvases",
              "from the paper (as in the reference code): the canvas starts as uniform random tokens and every "
              "position not accepted is renoised each step, where the EB-Sampler unmasks [MASK]s for good; the "
              "temperature schedule and the adaptive stop come from DiffusionGemma's generate, not the paper",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: EntropyBoundConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    device, start = model.device, len(prompt_ids)
    net_config = model.model.config
    if model.block_diffusion:
        reader: GemmaCanvas | PlainCanvas = GemmaCanvas(model)
        length = config.canvas_length or net_config.canvas_length
    else:
        reader, length = PlainCanvas(model), config.canvas_length or PLAIN_CANVAS_LENGTH
    vocab = net_config.get_text_config().vocab_size
    steps, eos = config.max_denoising_steps, model.eos_token_ids
    reader.encode(prompt_ids)  # 1.
    step = 0
    for block in range(math.ceil(max_new_tokens / length)):
        first = block * length
        positions = list(range(first, first + length))
        canvas = torch.randint(0, vocab, (1, length), generator=rng, device=device)  # 2. x_T ~ U(V)  (1, L)
        conditioning: torch.Tensor | None = None
        history: deque = deque(maxlen=config.stability_threshold)
        for remaining in range(steps, 0, -1):  # 3. n = N .. 1
            raw = reader.logits(canvas, conditioning)  # a. (1, L, vocab)
            logits = raw / step_temperature(config, remaining, device)  # b.
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            samples = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=rng).view(1, length)  # c.
            draft = torch.argmax(logits, dim=-1)  # (1, L)
            entropy = token_entropy(logits)  # (1, L)
            accepted, load = entropy_bound_accept(entropy, config.entropy_bound)  # d.
            noise = torch.randint(0, vocab, (1, length), generator=rng, device=device)  # e.
            stop = stable_and_confident(history, draft, entropy, config.confidence_threshold)  # f.
            last = stop or remaining == 1  # 4. then the draft is the canvas's output
            yield _record(config, step, remaining, positions, draft, samples, entropy, load, probs, accepted,
                          stop, last)
            step += 1
            if last:
                break
            canvas = torch.where(accepted, samples, noise)  # x_{t−1}: accepted samples, fresh noise elsewhere
            conditioning = logits  # self-conditioning: the tempered logits
        output = draft[0].tolist()
        for index, token in enumerate(output):  # departure: the runner may stop inside the canvas (budget, end)
            yield commit_token(model, first + index, start + first + index, token, raw[0, index], logits[0, index],
                               details={"denoising_step": step - 1, "canvas": block}, origin="denoised")
        if eos.intersection(output):
            return
        reader.encode(output)  # 1. the finished canvas joins the context


def _record(config: EntropyBoundConfig, step: int, remaining: int, positions: list[int], draft: torch.Tensor,
            samples: torch.Tensor, entropy: torch.Tensor, load: torch.Tensor, probs: torch.Tensor,
            accepted: torch.Tensor, stop: bool, last: bool) -> UnmaskStep:
    """The UnmaskStep of one denoising step over the canvas `positions` (tensors `(1, L, ...)`): what it accepted
    and renoised, or at the canvas's last step its argmax everywhere."""
    taken = [p for p, a in zip(positions, accepted[0].tolist(), strict=True) if a]
    if last:
        why = (f"stable and confident (mean entropy {float(entropy.mean()):.4f} < {config.confidence_threshold:g})"
               if stop else f"all {config.max_denoising_steps} steps run")
        committed, committed_ids, renoised = positions, draft[0].tolist(), []
        rule = f"{why}: the argmax canvas is the output (this step accepted {len(taken)})"
    else:
        committed, committed_ids = taken, [int(samples[0, positions.index(p)]) for p in taken]
        renoised = sorted(set(positions) - set(taken))
        temperature = float(step_temperature(config, remaining, probs.device))
        rule = (f"accepted the {len(taken)} lowest-entropy samples (ΣH − max H ≤ {config.entropy_bound:g}), "
                f"renoised {len(renoised)}; T = {temperature:.3f}")
    top2 = torch.topk(probs[0], 2, dim=-1).values  # (L, 2)
    return UnmaskStep(step=step, block_start=positions[0], block_end=positions[-1] + 1, masked=positions,
                      predicted_ids=draft[0].tolist(), confidences=_floats(-entropy[0]),
                      margins=_floats(top2[:, 0] - top2[:, 1]), entropies=_floats(entropy[0]), committed=committed,
                      committed_ids=committed_ids, remasked=renoised, scores=_floats(load[0]), all_in=last,
                      rule=rule, recomputed=positions)


def _floats(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values.tolist()]
