"""SpecTr's K-SEQ selection vs recursive rejection sampling on the same drafts, on the embedded model.

Usage: python benchmarks/bench_spectr.py [--drafts 1,2,4,8] [--new-tokens 48] [--prompts assets/prompts.jsonl]
Every round of a `spectr` run (sampling rule, T = 1) records, on its own k i.i.d. drafts: the chance that the
root's draws yield an accepted token under K-SEQ (1 - (1 - beta)^k) and under rejection sampling, and how many
draft tokens each accepts (RRS: a shadow verification with its own generator). The table gives their means over
all rounds of all prompts, per k: the comparison the SpecTr paper is about, measured on the same draws.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.models import load_model  # noqa: E402
from explorer.request import RunRequest  # noqa: E402
from explorer.runner import run_to_end  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-length", type=int, default=3)
    parser.add_argument("--prompts", default=str(ROOT / "assets" / "prompts.jsonl"))
    args = parser.parse_args()
    lm = load_model(None, dtype="float32", device="cpu")
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    print(f"embedded SmolLM2-135M-Instruct, drafts from the model minus its middle quarter of layers, sampling rule "
          f"T = 1, L = {args.draft_length}, {len(prompts)} prompts x {args.new_tokens} tokens, seed 0")
    print("| k | rounds | root acceptance K-SEQ | root acceptance RRS | accepted/round K-SEQ | accepted/round RRS "
          "(same drafts) | tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in (int(v) for v in args.drafts.split(",")):
        rounds, tokens, seconds = [], 0, 0.0
        for prompt in prompts:
            trace = run_to_end(lm, RunRequest.build("spectr", {"rule": "sampling", "drafts": k,
                                                               "draft_length": args.draft_length},
                                                    prompt, max_new_tokens=args.new_tokens, seed=0))
            rounds += [r for r in trace.rounds if "kseq_root_accept" in r.details]
            tokens += len(trace.token_ids)
            seconds += trace.finished.wall_time_s
        kseq, rrs, rrs_accepted = (statistics.mean(float(r.details[key]) for r in rounds)
                                   for key in ("kseq_root_accept", "rrs_root_accept", "rrs_accepted"))
        print(f"| {k} | {len(rounds)} | {kseq:.3f} | {rrs:.3f} | "
              f"{statistics.mean(r.accepted_count for r in rounds):.2f} | "
              f"{rrs_accepted:.2f} | {tokens / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
