"""Draft-verify methods against greedy on the embedded model, per prompt category, in one process.

Usage: python benchmarks/bench_speculative.py [--new-tokens 64] [--repeats 3] [--prompts assets/prompts.jsonl]
       [--methods greedy,prompt_lookup,...]
For every method and prompt: median wall time over the repeats; speedup = greedy's time / the method's time on
the same prompt (same process, same machine); mean accepted tokens per verification round; agreement = the share
of the output before its first token that differs from greedy's (100% for every lossless method: a check; below
it for the lossy ones, EAD here, whose share of tokens written by the large model is printed after the table).
transformers' `generate` with prompt_lookup_num_tokens=10 and with an assistant model are in the table as references.
The draft model for `speculative` and for transformers' assistant is the same: the embedded model cut to its first
8 layers (no smaller model with this vocabulary is available offline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import truncated_copy  # noqa: E402

from explorer.models import load_model  # noqa: E402
from explorer.request import RunRequest  # noqa: E402
from explorer.runner import run_to_end  # noqa: E402

DRAFT_LAYERS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default=str(ROOT / "assets" / "prompts.jsonl"))
    parser.add_argument("--methods", default="")
    parser.add_argument("--json-out", default="")
    parser.add_argument("--eagle-head", default=str(ROOT / "assets" / "drafters" / "smollm2-135m-eagle"),
                        help="a trained head for the 'eagle' row (train-drafter's output directory)")
    args = parser.parse_args()

    lm = load_model(None, dtype="float32", device="cpu")
    draft_dir = truncated_copy(lm, DRAFT_LAYERS, Path(tempfile.mkdtemp()) / "draft")
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]

    ours = {
        "greedy": ("greedy", {}),
        "prompt_lookup": ("prompt_lookup", {}),
        "jacobi": ("jacobi", {"window": 8}),
        "speculative": ("speculative", {}),  # draft_model 'auto': the shipped EAGLE head on the embedded model
        "speculative_layer_skip": ("speculative", {"draft_model": "layer-skip"}),
        "self_speculative": ("self_speculative", {}),
        "self_spec_exit10": ("self_speculative", {"exit_after": 10}),
        f"speculative_{DRAFT_LAYERS}L": ("speculative", {"draft_model": str(draft_dir), "draft_length": 4}),
        "self_spec_skip4": ("self_speculative", {"skip": "13-16"}),
        "tree_topk_skip4": ("tree_speculative", {"mode": "topk", "branching": 2, "depth": 3, "skip": "13-16"}),
        "tree_dynamic_skip4": ("tree_speculative", {"mode": "dynamic", "budget": 8, "skip": "13-16"}),
        "token_recycling": ("token_recycling", {}),
        "lookahead": ("lookahead", {}),
        "aded": ("aded", {}),
        "spectr_k4_skip4": ("spectr", {"drafts": 4, "draft_length": 3, "draft_model": "layer-skip"}),
        "del": ("del", {}),
        "depth_decay": ("depth_decay", {}),
        "ead_skip_middle": ("ead", {}),
        "eagle": ("eagle", {"drafter": args.eagle_head}),
        "eagle_tree": ("eagle", {"drafter": args.eagle_head, "tree": "dynamic"}),
        "eagle_g1": ("eagle", {"drafter": args.eagle_head, "draft_length": 1, "adaptive": False}),
        "eagle_g2": ("eagle", {"drafter": args.eagle_head, "draft_length": 2, "adaptive": False}),
        "eagle_tree_small": ("eagle", {"drafter": args.eagle_head, "tree": "dynamic", "tree_top_k": 2, "depth": 3,
                                       "budget": 4}),
    }
    references = {"hf_greedy": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": 10},
                  f"hf_assistant_{DRAFT_LAYERS}L": {"assistant_model": assistant}}
    chosen = [m for m in args.methods.split(",") if m] or [*ours, *references]

    outputs: dict[tuple[str, str], list[int]] = {}
    large_share: dict[str, list[float]] = defaultdict(list)

    def run_ours(method: str, prompt: str) -> tuple[float, int, float]:
        name, params = ours[method]
        trace = run_to_end(lm, RunRequest.build(name, params, prompt, chat=True, max_new_tokens=args.new_tokens))
        outputs[method, prompt] = trace.token_ids
        owners = [s.details["large"] for s in trace.token_steps if "large" in s.details]
        if owners:
            large_share[method].append(sum(owners) / len(owners))
        return trace.finished.wall_time_s, len(trace.token_ids), trace.mean_accepted_tokens

    def agreement(method: str, prompt: str) -> float:
        mine, reference = outputs.get((method, prompt)), outputs.get(("greedy", prompt))
        if mine is None or not reference:
            return float("nan")
        same = next((i for i, (a, b) in enumerate(zip(mine, reference, strict=False)) if a != b),
                    min(len(mine), len(reference)))
        return same / max(len(mine), 1)

    def run_hf(method: str, prompt: str) -> tuple[float, int, float]:
        ids = torch.tensor([lm.encode_prompt(prompt, chat=True)])
        t0 = time.perf_counter()
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.new_tokens, **references[method])
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1], float("nan")

    run_ours("greedy", prompts[0]["prompt"])  # warm-up
    results: dict[str, dict[str, tuple[float, int, float]]] = defaultdict(dict)
    for item in prompts:
        for method in chosen:
            runner = run_ours if method in ours else run_hf
            runs = [runner(method, item["prompt"]) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            results[method][item["name"]] = (wall, runs[0][1], runs[0][2])
            print(f"  {item['name']:14} {method:22} {runs[0][1] / wall:6.1f} tok/s  mat={runs[0][2]:.2f}",
                  file=sys.stderr, flush=True)

    categories = list(dict.fromkeys(item["category"] for item in prompts))
    print(f"embedded SmolLM2-135M-Instruct, cpu fp32, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; speedup = greedy time / method time on the same prompt (geometric mean "
          f"over the category's prompts); MAT = mean accepted tokens per verification round")
    header = ("| method | " + " | ".join(f"{c}: tok/s, speedup, MAT" for c in categories)
              + " | all: speedup | all: agreement |")
    print(header)
    print("|---|" + "---:|" * (len(categories) + 2))
    for method in chosen:
        cells, all_ratios = [], []
        for category in categories:
            names = [i["name"] for i in prompts if i["category"] == category]
            ratios = [results["greedy"][n][0] / results[method][n][0] for n in names] if "greedy" in results else []
            all_ratios += ratios
            tps = statistics.mean(results[method][n][1] / results[method][n][0] for n in names)
            mat = statistics.mean(results[method][n][2] for n in names)
            speed = f"{statistics.geometric_mean(ratios):.2f}x" if ratios else "–"
            cells.append(f"{tps:.1f}, {speed}, {'–' if mat != mat else f'{mat:.2f}'}")
        overall = f"{statistics.geometric_mean(all_ratios):.2f}x" if all_ratios else "–"
        agree = [agreement(method, item["prompt"]) for item in prompts]
        agree_cell = "–" if any(a != a for a in agree) else f"{statistics.mean(agree):.0%}"
        print(f"| {method} | " + " | ".join(cells) + f" | {overall} | {agree_cell} |")
    from explorer.models import decoder_layers
    from explorer.strategies.draft_models import middle_layers

    total = len(decoder_layers(lm.model))
    small_cost = (total - len(middle_layers(total))) / total  # the default small model: the middle quarter skipped
    for method, shares in large_share.items():
        share = statistics.mean(shares)
        compute = share + (1 - share) * small_cost
        print(f"{method}: {share:.0%} of tokens written by the large model; compute ~ {compute:.0%} "
              f"of the large model's per token (small model = {small_cost:.0%} of its layers; catch-up passes not "
              "counted)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
