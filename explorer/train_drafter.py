"""Train a draft head (explorer.heads: EAGLE-style or Medusa) for a target model, on this machine.

Data (no download): the target's own features by teacher-forced passes (no generation needed) over local English
text — the Python standard library's docstrings (explorer.ngram.stdlib_docstrings) and this repository's docs —
plus, optionally, the target's own chat answers to prompts made from those docstrings (self-distillation, as
HASS and EAGLE's re-generated data do), generated in batches. Each sequence gives pairs (e(x_(j+1)), f_j) ->
f_(j+1) and the target's argmax at j + 1.
Loss (EAGLE's): SmoothL1(f^, f) + w_ce CE(f^ W[V_d]^T, the target's argmax), with U(-noise, noise) added to the
input features (EAGLE's robustness to its own drafted features). Medusa-1's: sum over heads k of
CE(head_k(h_t), x_(t+1+k)), the sequence's own tokens (the target's own answers where self-generated).
V_d = the K tokens the target predicts most often on the data (plus its end tokens).
Resumable: a checkpoint (head, optimiser, step, data) is written to OUT every `--save-every` steps and picked up
by the same command; the finished head is written with save_head (fp16 + manifest with sha256), and
`training.json` holds the loss and held-out top-1 agreement curves (the training-curve view reads it).
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
    features: torch.Tensor  # (n, hidden): f_j
    argmax: torch.Tensor  # (n,): the target's prediction after j
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


@torch.no_grad()
def answer_sequences(model: Any, count: int, max_new_tokens: int = 96, batch: int = 8) -> list[Sequence_]:
    """The target's own greedy chat answers to prompts made from docstrings, teacher-forced for features."""
    topics = [t.split("\n\n")[0][:300] for t in stdlib_docstrings() if len(t) > 80]
    random.Random(0).shuffle(topics)
    asks = ("Explain this in plain words: ", "Summarize in two sentences: ", "Give an example of: ",
            "What is this used for? ")
    prompts = [asks[i % len(asks)] + topic for i, topic in enumerate(topics[:count])]
    sequences = []
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch):
        encoded = [model.encode_prompt(p, chat=True) for p in prompts[start:start + batch]]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        out = model.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        for row, prompt_ids in enumerate(encoded):
            answer = out[row, width:].tolist()
            ends = [i for i, t in enumerate(answer) if t in model.eos_token_ids]
            answer = answer[: ends[0] + 1] if ends else answer
            sequences.append(teacher_forced(model, prompt_ids + answer, first=len(prompt_ids) - 1))
    return sequences


def draft_vocabulary(sequences: list[Sequence_], size: int, eos: set[int]) -> list[int]:
    counts = Counter()
    for s in sequences:
        counts.update(s.argmax.tolist())
    ids = [t for t, _ in counts.most_common(size)]
    return sorted(set(ids) | set(eos))


def pair_batch(head: EagleHead, model: Any, s: Sequence_, noise: float, index_of: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    embed = model.model.get_input_embeddings()
    with torch.no_grad():
        embeds = embed(s.ids[1:].to(model.device)).float()  # e(x_(j+1)), j = 0 .. n-2
    features = s.features[:-1]
    if noise:
        features = features + (torch.rand_like(features) * 2 - 1) * noise
    labels = index_of[s.argmax[1:]]  # the target's prediction after j + 1, as an index into V_d (-100: outside)
    labels[: max(0, s.first)] = -100
    return embeds.unsqueeze(0), features.unsqueeze(0), s.features[1:].unsqueeze(0), labels


def medusa_labels(s: Sequence_, heads: int, index_of: torch.Tensor) -> torch.Tensor:
    """(K, n): head k's label at t is x_(t+1+k) as an index into V_d (-100 past the end, outside V_d, or in a
    chat prompt)."""
    n = len(s.ids)
    labels = torch.full((heads, n), -100, dtype=torch.long)
    for k in range(1, heads + 1):
        if n > k + 1:
            labels[k - 1, : n - k - 1] = index_of[s.ids[k + 1:]]
    labels[:, : max(0, s.first)] = -100
    return labels


def medusa_loss(head: MedusaHeads, s: Sequence_, index_of: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Summed CE over the heads, and head 1's top-1 accuracy."""
    scores = head(s.features)  # (K, n, |V_d|)
    labels = medusa_labels(s, len(head.blocks), index_of)
    loss = sum(nn.functional.cross_entropy(scores[k], labels[k], ignore_index=-100) for k in range(len(head.blocks))
               if (labels[k] >= 0).any())
    keep = labels[0] >= 0
    accuracy = float((scores[0].argmax(-1)[keep] == labels[0][keep]).float().mean()) if keep.any() else 0.0
    return loss, accuracy


def evaluate(head: Any, model: Any, held_out: list[Sequence_], index_of: torch.Tensor) -> float:
    """Top-1 agreement on held-out data: an EAGLE head's draft vs the target's argmax (teacher-forced pairs); a
    Medusa head 1's guess vs the token two ahead."""
    if isinstance(head, MedusaHeads):
        with torch.no_grad():
            return sum(medusa_loss(head, s, index_of)[1] for s in held_out) / max(1, len(held_out))
    lm_head = model.model.get_output_embeddings().weight.float()
    hits = total = 0
    with torch.no_grad():
        for s in held_out:
            embeds, features, _, labels = pair_batch(head, model, s, 0.0, index_of)
            predicted = head.predict(embeds, features)
            guess = head.logits(predicted[0], lm_head).argmax(-1)
            keep = labels >= 0
            hits += int((guess[keep] == labels[keep]).sum())
            total += int(keep.sum())
    return hits / max(total, 1)


def train(model: Any, out: str | Path, *, kind: str = "eagle", heads: int = 3, corpus_tokens: int = 20000,
          answers: int = 0, vocab: int = 8192,
          steps: int = 2000, lr: float = 3e-4, ce_weight: float = 0.1, noise: float = 0.1, save_every: int = 200,
          seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Collect (or reload) the data, train (or resume) the head, write it to `out`; returns the training record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    torch.manual_seed(seed)
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        sequences, held_out, draft_ids = state["sequences"], state["held_out"], state["draft_ids"]
    else:
        started = time.perf_counter()
        data = corpus_sequences(model, corpus_tokens) + (answer_sequences(model, answers) if answers else [])
        random.Random(seed).shuffle(data)
        cut = max(1, len(data) // 20)
        held_out, sequences = data[:cut], data[cut:]
        draft_ids = draft_vocabulary(sequences, vocab, set(model.eos_token_ids))
        state = {"step": 0, "curve": [], "data_s": time.perf_counter() - started}
    lm_head = model.model.get_output_embeddings().weight.detach().float()
    head = (EagleHead(model.model.config, draft_ids) if kind == "eagle"
            else MedusaHeads(model.model.config, draft_ids, heads, lm_head)).to(model.device)
    optimiser = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr)
    if "head" in state:
        head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
    index_of = torch.full((model.model.config.vocab_size,), -100, dtype=torch.long)
    index_of[torch.tensor(draft_ids)] = torch.arange(len(draft_ids))
    regression, classify = nn.SmoothL1Loss(), nn.CrossEntropyLoss(ignore_index=-100)
    order = random.Random(seed + state["step"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc="training draft head", unit="step")
    curve = state["curve"]
    for step in range(state["step"], steps):
        s = sequences[order.randrange(len(sequences))]
        if kind == "medusa":
            loss = medusa_loss(head, s, index_of)[0]
        else:
            embeds, features, targets, labels = pair_batch(head, model, s, noise, index_of)
            predicted = head.predict(embeds, features)
            loss = regression(predicted, targets) + ce_weight * classify(head.logits(predicted[0], lm_head), labels)
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimiser.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": round(loss.item(), 5),
                          "agreement": round(evaluate(head, model, held_out, index_of), 4)})
            torch.save({**state, "step": step + 1, "curve": curve, "head": head.state_dict(),
                        "optimiser": optimiser.state_dict(), "sequences": sequences, "held_out": held_out,
                        "draft_ids": draft_ids}, checkpoint)
    if bar is not None:
        bar.close()
    tokens = sum(len(s.ids) for s in sequences)
    record = {"kind": kind, "steps": steps, "train_tokens": tokens, "held_out_sequences": len(held_out),
              "corpus_tokens": corpus_tokens, "answers": answers, "vocab": len(draft_ids), "lr": lr,
              "ce_weight": ce_weight, "noise": noise, "curve": curve,
              "data": "stdlib docstrings + repository docs (teacher-forced)"
                      + (f" + {answers} self-generated chat answers" if answers else "")}
    save_head(head, model, out, {"training": record})
    (out / "training.json").write_text(json.dumps(record, indent=1))
    from viz.drafting import training_curve_figure  # a figure of the curve beside the head

    training_curve_figure(record).write_html(out / "training.html", include_plotlyjs="cdn")
    return record
