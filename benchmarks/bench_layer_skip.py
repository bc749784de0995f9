"""Layer-skip drafting on the embedded model: how often the skipped model agrees with the full model, and what
that buys, for each way of drafting (issue 11): the draft on the target's own KV cache (Draft & Verify, CLaSp)
vs a separate draft cache, and a fixed skipped set vs CLaSp's DP search vs the per-layer ranking.

Usage: python benchmarks/bench_layer_skip.py [--prompts assets/prompts.jsonl] [--new-tokens 64] [--skip 13-16]
"agree@1" = the share of rounds whose first draft token the target accepted (next-token agreement of the
skipped model, greedy rule); MAT = mean accepted tokens per round; speedup = greedy's wall time / the method's,
same prompts, same process. Every row is token-identical to greedy (checked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.events import DraftRound  # noqa: E402
from explorer.models import load_model, warm_up  # noqa: E402
from explorer.request import RunRequest  # noqa: E402
from explorer.runner import run_to_end  # noqa: E402
from explorer.sweep import load_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(ROOT / "assets" / "prompts.jsonl"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip", default="13-16")
    args = parser.parse_args()
    lm = load_model(None, dtype="float32", device="cpu")
    warm_up(lm)
    prompts = [item.prompt for item in load_prompts(args.prompts)]
    rows = {
        f"skip {args.skip}, shared cache": {"skip": args.skip},
        f"skip {args.skip}, separate cache": {"skip": args.skip, "cache": "separate"},
        "CLaSp DP (M=4, every round), shared": {"auto_skip": 4},
        "rank (M=4, every 8 rounds), separate": {"auto_skip": 4, "search": "rank", "search_every": 8,
                                                 "cache": "separate"},
        "rank (M=4, every round), shared": {"auto_skip": 4, "search": "rank"},
    }

    def timed(strategy: str, params: dict) -> tuple[float, list]:
        t0 = time.perf_counter()
        traces = [run_to_end(lm, RunRequest.build(strategy, params, p, max_new_tokens=args.new_tokens, chat=True))
                  for p in prompts]
        return time.perf_counter() - t0, traces

    base_time, greedy = timed("greedy", {})
    print(f"embedded SmolLM2-135M-Instruct, cpu fp32; {len(prompts)} prompts x {args.new_tokens} new tokens; "
          "self_speculative, draft_length 4 (adaptive), greedy rule")
    print("| drafting | agree@1 | MAT | speedup | equal to greedy |\n|---|---:|---:|---:|---|")
    for label, params in rows.items():
        seconds, traces = timed("self_speculative", params)
        rounds = [e for t in traces for e in t.events if isinstance(e, DraftRound) and e.draft_tokens]
        agree = sum(r.accepted_count > 0 for r in rounds) / max(len(rounds), 1)
        mat = sum(r.accepted_count + 1 for r in rounds) / max(len(rounds), 1)
        equal = all(a.token_ids == b.token_ids for a, b in zip(traces, greedy, strict=True))
        print(f"| {label} | {agree:.0%} | {mat:.2f} | {base_time / seconds:.2f}x | {'yes' if equal else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
