"""Train a draft head (explorer.heads: EAGLE-style or Medusa) for a target model, on this machine.

Data (no download): a self-distillation file written by `python -m explorer drafter-data` (explorer.drafter_data:
the target's own answers to prompts made on this machine; the features stored with them, read off the
generation's own passes, or, in a file without them, from a teacher-forced target pass per batch: cheap on a GPU),
or, without one, the target's own features by teacher-forced passes over local English text (the Python standard
library's docstrings, this repository's docs) plus, optionally, the target's own chat answers to prompts made from
those docstrings, generated in batches.
Each sequence gives pairs (e(x_(j+1)), f_j) -> f_(j+1) and the target's argmax at j + 1.
Loss (EAGLE's, as its authors' SafeAILab/EAGLE: eagle/train/main.py: compute_loss has it, with v_w = 1, p_w = 0.1):
SmoothL1(f^, f) + w_ce CE(q, p), q = softmax(f^_(j+1) W[V_d]^T) the head's draft distribution and the soft target
p = softmax(f_(j+1) W[V_d]^T): the frozen target LM head over the stored target feature, i.e. the target's own
next-token distribution restricted to V_d and renormalised (the mass outside V_d is dropped: q is zero there, so
CE against it would be infinite, and the head could not learn it anyway). Positions where the target's argmax lies
outside V_d are left out of the CE term, as EAGLE-3's code does with a reduced vocabulary
(eagle/traineagle3/cnets.py: position_mask). `labels="hard"` trains on the target's argmax instead (one-hot p).
Feature noise (EAGLE's robustness to its own drafted features), as the authors' code adds it
(eagle/train/main.py: AddUniformNoise, "noise": "uniform", "std": 0.2, applied per sequence of n positions):
(U(0, 1) - 0.5) * 0.2 * 512 / n per element, i.e. U(-a, a) with a = noise * 512 / n and noise = 0.1: U(-0.1, 0.1)
at n = 512 (the paper's figure), wider on shorter sequences; n here is the sequence's own length as trained (a
chat prompt cut to its last `max_prompt` tokens), not the authors' (up to 2048 tokens of ShareGPT).
Medusa-1's loss: sum over heads k of CE(head_k(h_t), x_(t+1+k)), the sequence's own tokens (the target's own
answers where self-generated).
V_d = the K tokens the target predicts most often on the data (plus its end tokens).
Batches of `batch` sequences, right-padded; `unroll` > 1 trains on the head's own predicted features too (see
eagle_loss); `minutes` bounds the training time. Resumable: a checkpoint (head, optimiser, step, data) is
written to OUT every `save_every` steps and picked up by the same command; the finished head is written with
save_head (fp16 + manifest with sha256), and `training.json` holds the loss and the held-out top-1 agreement
per draft depth (the training-curve view reads it).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explorer.heads import EagleHead, MedusaHeads, save_head
from explorer.ngram import stdlib_docstrings

REPO_DOCS = ("README.md", "BENCHMARKS.md", "ARCHITECTURE.md")


@dataclass
class Sequence_:
    ids: torch.Tensor  # (n,)
    features: torch.Tensor | None  # (n, hidden): f_j (None: computed per batch, see pad_batch)
    argmax: torch.Tensor | None  # (n,): the target's prediction after j
    first: int  # the first position whose pair is trained on (after a chat prompt: the answer)


def local_texts(limit_chars: int) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text(encoding="utf-8") for name in REPO_DOCS if (p := root / name).is_file()]
    texts += list(stdlib_docstrings())
    out, total = [], 0
    for text in texts:
        if total >= limit_chars:
            break
        out.append(text[: limit_chars - total])
        total += len(out[-1])
    return out


@torch.no_grad()
def teacher_forced(model: Any, ids: list[int], first: int = 0) -> Sequence_:
    out = model.model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
    return Sequence_(torch.tensor(ids), out.hidden_states[-1][0].float().cpu(), out.logits[0].argmax(-1).cpu(), first)


def corpus_sequences(model: Any, tokens: int, chunk: int = 256) -> list[Sequence_]:
    """Teacher-forced chunks of local text, `tokens` tokens in all."""
    stream: list[int] = []
    for text in local_texts(tokens * 6):
        stream += model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= tokens:
            break
    return [teacher_forced(model, stream[i:i + chunk]) for i in range(0, min(len(stream), tokens) - 8, chunk)]


def answer_sequences(model: Any, count: int, max_new_tokens: int = 96, batch: int = 8) -> list[Sequence_]:
    """The target's own greedy chat answers to prompts made from docstrings, teacher-forced for features."""
    from explorer.drafter_data import generate

    topics = [t.split("\n\n")[0][:300] for t in stdlib_docstrings() if len(t) > 80]
    random.Random(0).shuffle(topics)
    asks = ("Explain this in plain words: ", "Summarize in two sentences: ", "Give an example of: ",
            "What is this used for? ")
    prompts = [asks[i % len(asks)] + topic for i, topic in enumerate(topics[:count])]
    return [teacher_forced(model, prompt_ids + answer, first=len(prompt_ids) - 1)
            for prompt_ids, answer in generate(model, prompts, max_new_tokens=max_new_tokens, batch=batch)]


def pad_batch(model: Any, batch: list[Sequence_]) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, features, argmax, valid, first) of a batch: features and argmax as stored, or from one
    teacher-forced target pass over the padded batch (right padding leaves a causal model's real positions as
    they are)."""
    width = max(len(s.ids) for s in batch)
    device = model.device
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.ids)] = s.ids
    ids = ids.to(device)
    lengths = torch.tensor([len(s.ids) for s in batch], device=device)
    valid = torch.arange(width, device=device)[None] < lengths[:, None]
    first = torch.tensor([s.first for s in batch], device=device)
    if all(s.features is not None for s in batch):
        hidden = batch[0].features.shape[-1]
        features = torch.zeros(len(batch), width, hidden)
        argmax = torch.zeros(len(batch), width, dtype=torch.long)
        for row, s in enumerate(batch):
            features[row, : len(s.ids)], argmax[row, : len(s.ids)] = s.features, s.argmax
        return ids, features.to(device), argmax.to(device), valid, first
    with torch.no_grad():  # the decoder's last hidden state is hidden_states[-1]; argmax in slices (no |V| logits)
        features = model.model.get_decoder()(input_ids=ids).last_hidden_state.float()
        weight = model.model.get_output_embeddings().weight.float()
        argmax = torch.cat([(rows @ weight.T).argmax(-1) for rows in features.split(8)])
    return ids, features, argmax, valid, first


def feature_noise(inputs: torch.Tensor, lengths: torch.Tensor, noise: float) -> torch.Tensor:
    """EAGLE's uniform feature noise for `inputs` (batch, n, hidden): U(-a, a) per element with a = noise * 512 / the
    row's sequence length `lengths` (batch,), the authors' AddUniformNoise (std 0.2 = 2 * noise) on sequences of
    different lengths."""
    half_width = noise * 512 / lengths.clamp(min=1).to(inputs.dtype)  # (batch,)
    return (torch.rand_like(inputs) * 2 - 1) * half_width[:, None, None]


def soft_cross_entropy(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_v p_v log q_v, q = softmax(scores), p = target (rows of probabilities)."""
    return -(target * torch.log_softmax(scores, dim=-1)).sum(-1).mean()


def eagle_loss(head: EagleHead, model: Any, batch: tuple[torch.Tensor, ...], index_of: torch.Tensor,
               lm_head: torch.Tensor, *, noise: float = 0.0, ce_weight: float = 0.1, unroll: int = 1,
               labels: str = "soft") -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """EAGLE's loss over a padded batch, and (hits, count) of top-1 agreement with the target per unroll step.
    CE against the soft target p = softmax(f_(j+1+u) W[V_d]^T) (`labels="soft"`, EAGLE's) or the target's argmax
    (`"hard"`). Step u (0-based) feeds the pairs (e(x_(j+1+u)), input_j) -> f^_(j+1+u), input = f_j (+ noise) at
    u = 0 and the head's own f^_(j+u) after: the head trained on its own features as drafting meets them (HASS's
    harmonised training, Zhang et al. 2025, arXiv:2408.15766). Departure: at u >= 1 every position of the
    sequence reads predicted features, where drafting reads real ones for the accepted context."""
    if labels not in ("soft", "hard"):
        raise ValueError(f"labels must be 'soft' or 'hard', not {labels!r}")
    ids, features, argmax, valid, first = batch
    embeds = model.model.get_input_embeddings()(ids).float()
    inputs = features[:, :-1]
    if noise:
        inputs = inputs + feature_noise(inputs, valid.sum(dim=1), noise)
    total, agreement = 0.0, []
    n = features.shape[1] - 1
    for u in range(min(unroll, n)):
        span = n - u
        predicted = head.predict(embeds[:, 1 + u:], inputs[:, :span])
        pairs = torch.arange(span, device=ids.device)
        reg_mask = valid[:, 1 + u:]
        ce_mask = reg_mask & (pairs[None] >= first[:, None])
        hard = index_of[argmax[:, 1 + u:]]
        ce_mask = ce_mask & (hard >= 0)  # the target's argmax in V_d (EAGLE-3's position mask)
        regression = nn.functional.smooth_l1_loss(predicted, features[:, 1 + u:], reduction="none").mean(-1)
        scores = head.logits(predicted[ce_mask], lm_head)
        loss = regression[reg_mask].mean()
        if ce_mask.any():
            if labels == "soft":
                with torch.no_grad():  # the frozen target LM head over the stored target features
                    p = torch.softmax(head.logits(features[:, 1 + u:][ce_mask], lm_head).float(), dim=-1)
                loss = loss + ce_weight * soft_cross_entropy(scores.float(), p)
            else:
                loss = loss + ce_weight * nn.functional.cross_entropy(scores, hard[ce_mask])
        total = total + loss
        agreement.append((int((scores.argmax(-1) == hard[ce_mask]).sum()), int(ce_mask.sum())))
        inputs = predicted[:, :-1]
    return total / max(1, min(unroll, n)), agreement


def medusa_loss(head: MedusaHeads, batch: tuple[torch.Tensor, ...], index_of: torch.Tensor
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Summed CE over the heads (head k at t: x_(t+1+k), the sequence's own token, as an index into V_d; only
    answer positions), and (hits, count) of top-1 agreement per head."""
    ids, features, _, valid, first = batch
    scores = head(features)  # (K, batch, n, |V_d|)
    n = ids.shape[1]
    loss, agreement = 0.0, []
    for k in range(1, len(head.blocks) + 1):
        if n <= k + 1:
            break
        labels = index_of[ids[:, k + 1:]]
        positions = torch.arange(n - k - 1, device=ids.device)
        keep = valid[:, k + 1:] & (positions[None] >= first[:, None]) & (labels >= 0)
        if keep.any():
            chosen = scores[k - 1, :, : n - k - 1][keep]
            loss = loss + nn.functional.cross_entropy(chosen, labels[keep])
            agreement.append((int((chosen.argmax(-1) == labels[keep]).sum()), int(keep.sum())))
    return loss, agreement


def evaluate(head: Any, model: Any, held_out: list[Sequence_], index_of: torch.Tensor, batch: int = 8
             ) -> list[float]:
    """Top-1 agreement on held-out data per draft depth: an EAGLE head's draft vs the target's argmax
    (teacher-forced pairs at depth 1, its own predicted feature at depth 2); Medusa head k's guess vs the token
    k + 1 ahead."""
    lm_head = model.model.get_output_embeddings().weight.float()
    hits, totals = [0, 0, 0], [0, 0, 0]
    with torch.no_grad():
        for start in range(0, len(held_out), batch):
            padded = pad_batch(model, held_out[start:start + batch])
            if isinstance(head, MedusaHeads):
                counts = medusa_loss(head, padded, index_of)[1]
            else:
                counts = eagle_loss(head, model, padded, index_of, lm_head, unroll=2)[1]
            for depth, (h, t) in enumerate(counts[:3]):
                hits[depth] += h
                totals[depth] += t
    return [round(h / t, 4) for h, t in zip(hits, totals, strict=True) if t]


def load_data(model: Any, *, data: str | Path | None, corpus_tokens: int, answers: int, fraction: float,
              seed: int, max_length: int = 1024, max_prompt: int = 64
              ) -> tuple[list[Sequence_], list[Sequence_], str, list[dict[str, Any]]]:
    """(training sequences, held-out sequences, a description, the data files' records). From self-distillation
    files (comma-separated; explorer.drafter_data; features as stored, else computed per batch; sequences over
    `max_length` tokens left out; with stored features only the last `max_prompt` prompt positions are kept: the
    features still carry the whole prompt, and training time goes to the answers), else local text and `answers`
    fresh answers (features computed once, here)."""
    if data:
        from explorer.drafter_data import load_sequences

        sequences, parts, records = [], [], []
        for name in str(data).split(","):  # several files: their union
            ids, first, record = load_sequences(name)
            records.append(record)
            for (i, f, a), start in zip(ids, first, strict=True):
                cut = max(0, start - max_prompt) if f is not None else 0  # stored features hold the whole context
                if len(i) - cut <= max_length:
                    sequences.append(Sequence_(i[cut:], None if f is None else f[cut:], None if a is None else a[cut:],
                                               start - cut))
            if "licence" in record:  # drafter-data --text: teacher-forced local text
                parts.append(f"{Path(name).name}: {record['tokens']} tokens of text from {record['text_files']} "
                             f"files ({record['licence']})")
            else:
                parts.append(f"{Path(name).name}: {record['prompts']} prompts x {record['answers_per_prompt']} "
                             f"answers, {record['tokens']} tokens")
        description = "self-distillation data " + "; ".join(parts)
    else:
        records = []
        sequences = corpus_sequences(model, corpus_tokens) + (answer_sequences(model, answers) if answers else [])
        description = ("stdlib docstrings + repository docs (teacher-forced)"
                       + (f" + {answers} self-generated chat answers" if answers else ""))
    random.Random(seed).shuffle(sequences)
    cut = max(1, min(len(sequences) // 20, 200))
    held_out, sequences = sequences[:cut], sequences[cut:]
    if fraction < 1:
        sequences = sequences[: max(1, int(len(sequences) * fraction))]
        description += f", {fraction:g} of it used"
    return sequences, held_out, description, records


def vocabulary_counts(model: Any, sequences: list[Sequence_], size: int, batch: int = 16) -> list[int]:
    """V_d: the `size` tokens the target predicts most often on the training data, plus its end tokens."""
    counts: Counter = Counter()
    for start in range(0, len(sequences), batch):
        chunk = sequences[start:start + batch]
        if all(s.argmax is not None for s in chunk):
            for s in chunk:
                counts.update(s.argmax.tolist())
        else:
            _, _, argmax, valid, _ = pad_batch(model, chunk)
            counts.update(argmax[valid].tolist())
    ids = [t for t, _ in counts.most_common(size)]
    return sorted(set(ids) | set(model.eos_token_ids))


def train(model: Any, out: str | Path, *, kind: str = "eagle", heads: int = 3, corpus_tokens: int = 20000,
          answers: int = 0, data: str | Path | None = None, fraction: float = 1.0, vocab: int = 8192,
          steps: int = 2000, batch: int = 1, minutes: float | None = None, unroll: int = 1, lr: float = 3e-4,
          ce_weight: float = 0.1, noise: float = 0.1, labels: str = "soft", save_every: int = 200, seed: int = 0,
          progress: bool = True, command: str = "") -> dict[str, Any]:
    """Collect (or reload) the data, train (or resume) the head, write it to `out`; returns the training record.
    Stops after `steps` steps of `batch` sequences, or after `minutes` of training when given."""
    if labels not in ("soft", "hard"):
        raise ValueError(f"labels must be 'soft' or 'hard', not {labels!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    torch.manual_seed(seed)
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state.get("data"):
            sequences, held_out, description, _ = load_data(model, data=state["data"], corpus_tokens=0,
                                                             answers=0, fraction=state["fraction"], seed=seed)
        else:
            sequences, held_out, description = state["sequences"], state["held_out"], state["description"]
        draft_ids = state["draft_ids"]
    else:
        started = time.perf_counter()
        sequences, held_out, description, records = load_data(model, data=data, corpus_tokens=corpus_tokens,
                                                              answers=answers, fraction=fraction, seed=seed)
        draft_ids = vocabulary_counts(model, sequences, vocab)
        state = {"step": 0, "curve": [], "data_s": time.perf_counter() - started, "data": str(data or ""),
                 "fraction": fraction, "description": description, "train_s": 0.0,
                 "data_records": records}
    lm_head = model.model.get_output_embeddings().weight.detach().float()
    head = (EagleHead(model.model.config, draft_ids) if kind == "eagle"
            else MedusaHeads(model.model.config, draft_ids, heads, lm_head)).to(model.device)
    optimiser = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    if "head" in state:
        head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
    index_of = torch.full((model.model.config.vocab_size,), -100, dtype=torch.long)
    index_of[torch.tensor(draft_ids)] = torch.arange(len(draft_ids))
    index_of = index_of.to(model.device)
    order = random.Random(seed + state["step"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc="training draft head", unit="step")
    curve = state["curve"]
    began, step = time.perf_counter() - state["train_s"], state["step"]
    interval: list[float] = []
    while step < steps:
        padded = pad_batch(model, [sequences[order.randrange(len(sequences))] for _ in range(batch)])
        if kind == "medusa":
            loss = medusa_loss(head, padded, index_of)[0]
        else:
            loss = eagle_loss(head, model, padded, index_of, lm_head, noise=noise, ce_weight=ce_weight,
                              unroll=unroll, labels=labels)[0]
        done = max(step / steps, (time.perf_counter() - began) / (minutes * 60) if minutes else 0.0)
        for group in optimiser.param_groups:  # linear decay to a tenth
            group["lr"] = lr * (1 - 0.9 * min(1.0, done))
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimiser.step()
        step += 1
        interval.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        late = minutes is not None and time.perf_counter() - began > minutes * 60
        if step % save_every == 0 or step == steps or late:
            agreement = evaluate(head, model, held_out, index_of)
            curve.append({"step": step, "sequences_seen": step * batch,
                          "loss": round(sum(interval) / len(interval), 5),  # the mean since the last point
                          "agreement": agreement[0] if agreement else 0.0, "agreement_by_depth": agreement})
            state.update(step=step, curve=curve, train_s=time.perf_counter() - began, draft_ids=draft_ids,
                         head=head.state_dict(), optimiser=optimiser.state_dict())
            if not state["data"]:
                state.update(sequences=sequences, held_out=held_out)
            torch.save(state, checkpoint)
            interval = []
        if late:
            break
    if bar is not None:
        bar.close()
    tokens = sum(len(s.ids) for s in sequences)
    record = {"kind": kind, "steps": step, "batch": batch, "train_tokens": tokens,
              "held_out_sequences": len(held_out), "corpus_tokens": corpus_tokens, "answers": answers,
              "vocab": len(draft_ids), "lr": lr, "ce_weight": ce_weight, "noise": noise, "labels": labels,
              "unroll": unroll,
              "train_minutes": round(state["train_s"] / 60, 2), "curve": curve, "data": description,
              "data_records": state.get("data_records", []), "command": command}
    save_head(head, model, out, {"training": record})
    (out / "training.json").write_text(json.dumps(record, indent=1))
    try:
        from viz.drafting import training_curve_figure  # a figure of the curve beside the head
    except ImportError:  # plotly missing (a bare training machine): the curve is in training.json
        return record
    training_curve_figure(record).write_html(out / "training.html", include_plotlyjs="cdn")
    return record
