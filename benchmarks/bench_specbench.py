"""Spec-Bench on the embedded model: every draft-verify method (greedy rule) against greedy, in Spec-Bench's
leaderboard layout, with transformers' prompt lookup and assisted decoding as references.

Usage: python benchmarks/bench_specbench.py [--questions ../shared/spec_bench/question.jsonl] [--per-category 1]
       [--new-tokens 64] [--methods greedy,prompt_lookup,...] [--answers DIR]
Our methods run as a sweep (multi-turn questions as conversations, one run per turn) into a temporary database;
the references run transformers' `generate` on the same conversations (each turn's context holds that method's
own earlier answers, as Spec-Bench does). All answers go through `explorer.specbench`: speedup and mean accepted
tokens per task are what Spec-Bench's speed script computes, and "equal" is its equality check against greedy.
transformers does not report accept lengths, so its MAT is "–". The draft model for `speculative` and for
transformers' assistant is the same: the embedded model cut to its first 8 layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import truncated_copy  # noqa: E402

from explorer.models import load_model, warm_up  # noqa: E402
from explorer.specbench import answers, default_question_file, file_stem, leaderboard_markdown  # noqa: E402
from explorer.sweep import PromptItem, load_prompts, parse_strategies, per_category, run_sweep  # noqa: E402
from store import Store  # noqa: E402

DRAFT_LAYERS = 8


def reference_answers(lm, items: list[PromptItem], method: str, options: dict, new_tokens: int) -> list[dict]:
    """Spec-Bench answers from transformers' generate (greedy) with `options`, turn by turn."""
    eos = lm.eos_token_ids
    rows = []
    for item in items:
        history: list[tuple[str, str]] = []
        texts, counts, times = [], [], []
        for prompt in item.turns:
            ids = torch.tensor([lm.encode_prompt(prompt, chat=True, history=history)])
            t0 = time.perf_counter()
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, **options)
            times.append(time.perf_counter() - t0)
            generated = out[0, ids.shape[1]:].tolist()
            cut = next((i + 1 for i, t in enumerate(generated) if t in eos), len(generated))
            texts.append(lm.decode(generated[:cut]).strip())
            counts.append(cut)
            history.append((prompt, texts[-1]))
        rows.append({"question_id": item.question_id, "category": item.category, "answer_id": f"hf-{item.name}",
                     "model_id": file_stem(lm.info.model_id, method),
                     "choices": [{"index": 0, "turns": texts, "decoding_steps": [], "new_tokens": counts,
                                  "wall_time": times, "accept_lengths": []}], "tstamp": time.time()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", default=str(default_question_file() or ""))
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--methods", default="")
    parser.add_argument("--answers", default="", help="also write the answer files into this directory")
    args = parser.parse_args()
    if not args.questions:
        raise SystemExit("give --questions: Spec-Bench's question.jsonl (see the README)")

    lm = load_model(None, dtype="float32", device="cpu")
    warm_up(lm)  # the first timed method must not pay for kernel set-up
    draft_dir = truncated_copy(lm, DRAFT_LAYERS, Path(tempfile.mkdtemp()) / "draft")
    from transformers import AutoModelForCausalLM

    ours = {
        "greedy": "greedy",
        "prompt_lookup": "prompt_lookup",
        "jacobi": "jacobi:window=8",
        "lookahead": "lookahead",
        "token_recycling": "token_recycling",
        "self_speculative": "self_speculative",
        "self_spec_rank8_separate": "self_speculative:search=rank,search_every=8,cache=separate",
        "self_spec_dp_every8": "self_speculative:search_every=8",
        f"speculative_{DRAFT_LAYERS}L": f"speculative:draft_model={draft_dir},draft_length=4",
        "tree_topk_skip4": "tree_speculative:mode=topk,branching=2,depth=3,skip=13-16",
        "tree_dyspec_skip4": "tree_speculative:mode=dynamic,budget=16,skip=13-16",
        "token_recycling_widths": "token_recycling:tree=widths",
    }
    references = {"hf_prompt_lookup": {"prompt_lookup_num_tokens": 10},
                  f"hf_assistant_{DRAFT_LAYERS}L": {"assistant_model": lambda: AutoModelForCausalLM.from_pretrained(
                      draft_dir).eval()}}
    chosen = [m for m in args.methods.split(",") if m] or [*ours, *references]
    items = per_category(load_prompts(args.questions), args.per_category)
    turns = sum(len(i.turns) for i in items)
    print(f"{len(items)} questions ({turns} turns), first {args.per_category} of each category; "
          f"{args.new_tokens} new tokens per turn", file=sys.stderr)

    store = Store(f"sqlite:///{Path(tempfile.mkdtemp()) / 'specbench.sqlite'}")
    for label in [m for m in chosen if m in ours]:
        method = parse_strategies(ours[label])[0]
        method = type(method)(label, method.strategy, method.params, method.config)  # short labels in the table
        t0 = time.perf_counter()
        report = run_sweep(lm, items, [method], 1, store, max_new_tokens=args.new_tokens, chat=True)
        print(f"  {label:22} {time.perf_counter() - t0:6.1f} s, {report.done} runs, {len(report.failed)} failed",
              file=sys.stderr, flush=True)
        for what, error in report.failed:
            print(f"    failed: {what}: {error}", file=sys.stderr)
    found = answers(store.load_traces(store.run_ids(sweep_only=True)))
    for label in [m for m in chosen if m in references]:
        options = {k: (v() if callable(v) else v) for k, v in references[label].items()}
        t0 = time.perf_counter()
        rows = reference_answers(lm, items, label, options, args.new_tokens)
        found[rows[0]["model_id"]] = rows
        print(f"  {label:22} {time.perf_counter() - t0:6.1f} s", file=sys.stderr, flush=True)

    if args.answers:
        out = Path(args.answers)
        out.mkdir(parents=True, exist_ok=True)
        for stem, rows in found.items():
            (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"Spec-Bench, embedded SmolLM2-135M-Instruct, cpu fp32, {torch.get_num_threads()} threads; "
          f"{len(items)} questions ({turns} turns: the first {args.per_category} of each category), "
          f"{args.new_tokens} new tokens per turn, greedy rule; speedup and MAT per task as Spec-Bench's speed "
          "script computes them, against greedy in the same process")
    print(leaderboard_markdown(found, file_stem(lm.info.model_id, "greedy")))


if __name__ == "__main__":
    main()
