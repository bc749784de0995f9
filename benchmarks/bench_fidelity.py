"""What the paper-faithful versions of issue 11 change, measured on the embedded model in one process:
BiLD's lossy rollback (speed against agreement with greedy), lookahead's Jacobi vs pool hits, DySpec's draft
passes per round, Token Recycling's template and warm start (`keep_table`), Top-H's kept sets under the two
bounds, Mirostat v1 vs v2 against their target, and CNTP's trials.

Usage: python benchmarks/bench_fidelity.py [--prompts assets/prompts.jsonl] [--new-tokens 64] [--only bild,...]
Speedup = greedy's wall time over the same prompts / the method's (same process); MAT = mean accepted tokens
per round (accepted + 1); "greedy agreement" = the share of output positions whose token equals greedy's at
the same position, "identical" = outputs equal to greedy's, out of all prompts. BiLD's small model is the
embedded model cut to its first 8 layers (no smaller model with this vocabulary is available offline).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import truncated_copy  # noqa: E402

from explorer.events import DraftRound  # noqa: E402
from explorer.models import load_model, warm_up  # noqa: E402
from explorer.request import RunRequest  # noqa: E402
from explorer.runner import run_to_end  # noqa: E402
from explorer.strategies.lookahead import hits  # noqa: E402
from explorer.strategies.token_recycling import TABLES  # noqa: E402
from explorer.sweep import load_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(ROOT / "assets" / "prompts.jsonl"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", default="bild,lookahead,dyspec,recycling,top_h,mirostat,cautious")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    lm = load_model(None, dtype="float32", device="cpu")
    warm_up(lm)
    prompts = [item.prompt for item in load_prompts(args.prompts)]

    def timed(strategy: str, params: dict) -> tuple[float, list]:
        t0 = time.perf_counter()
        traces = [run_to_end(lm, RunRequest.build(strategy, params, p, max_new_tokens=args.new_tokens, chat=True))
                  for p in prompts]
        return time.perf_counter() - t0, traces

    def rounds(traces: list) -> list[DraftRound]:
        return [e for t in traces for e in t.events if isinstance(e, DraftRound) and e.draft_tokens]

    def mat(traces: list) -> float:
        found = rounds(traces)
        return sum(r.accepted_count + 1 for r in found) / max(len(found), 1)

    base, greedy = timed("greedy", {})
    print(f"embedded SmolLM2-135M-Instruct, cpu fp32; {len(prompts)} prompts x {args.new_tokens} new tokens, "
          f"chat template; greedy: {base:.1f} s\n")

    def agreement(traces: list) -> tuple[float, int]:
        same = total = identical = 0
        for trace, reference in zip(traces, greedy, strict=True):
            total += len(reference.token_ids)
            same += sum(a == b for a, b in zip(trace.token_ids, reference.token_ids, strict=False))
            identical += trace.token_ids == reference.token_ids
        return same / max(total, 1), identical

    if "bild" in parts:
        draft = truncated_copy(lm, 8, Path(tempfile.mkdtemp()) / "draft8")
        print("BiLD (speculative, fallback_threshold 0.5, draft_length 8); small model: the first 8 layers, or the "
              "target with its middle quarter of layers skipped (layer-skip)\n")
        print("| small model | rollback alpha_RB | speedup | MAT | greedy agreement | identical | "
              "rolled back per round |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for small, alpha in [(s, a) for s in ("layer-skip", str(draft)) for a in (0.0, 1.0, 2.0, 4.0, 8.0)]:
            params = {"draft_model": small, "fallback_threshold": 0.5, "draft_length": 8, "rollback": alpha}
            seconds, traces = timed("speculative", params)
            share, identical = agreement(traces)
            found = rounds(traces)
            rolled = sum(float(r.details.get("rolled_back", 0)) for r in found) / max(len(found), 1)
            label = f"{alpha:g}" if alpha else "0 (exact verification)"
            name = "layer-skip" if small == "layer-skip" else "first 8 layers"
            print(f"| {name} | {label} | {base / seconds:.2f}x | {mat(traces):.2f} | {share:.0%} | "
                  f"{identical}/{len(prompts)} | {rolled:.2f} |", flush=True)
        print()
    if "lookahead" in parts:
        print("Lookahead: accepted tokens by branch\n")
        print("| config | speedup | MAT | Jacobi hits | pool hits |\n|---|---:|---:|---:|---:|")
        for params in ({}, {"window": 7, "ngram": 4, "guesses": 7}):
            seconds, traces = timed("lookahead", params)
            jacobi = pool = 0
            for r in rounds(traces):
                j, p = hits(int(r.details["window"]), r.verdicts)
                jacobi, pool = jacobi + j, pool + p
            label = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults (W=5, N=3, G=3)"
            print(f"| {label} | {base / seconds:.2f}x | {mat(traces):.2f} | {jacobi} | {pool} |", flush=True)
        print()
    if "dyspec" in parts:
        print("DySpec (tree_speculative mode=dynamic, layer-skip draft 13-16): draft passes per round\n")
        print("| budget, threshold | speedup | MAT | nodes per round | draft passes per round |")
        print("|---|---:|---:|---:|---:|")
        for budget, threshold in ((8, 0.05), (16, 0.05), (16, 0.01)):
            params = {"mode": "dynamic", "budget": budget, "threshold": threshold, "skip": "13-16"}
            seconds, traces = timed("tree_speculative", params)
            found = rounds(traces)
            nodes = sum(len(r.draft_tokens) for r in found) / max(len(found), 1)
            passes = sum(float(r.details["draft_forward_passes"]) for r in found) / max(len(found), 1)
            print(f"| {budget}, {threshold} | {base / seconds:.2f}x | {mat(traces):.2f} | {nodes:.1f} | "
                  f"{passes:.2f} |", flush=True)
        print()
    if "recycling" in parts:
        print("Token Recycling: template vs widths, cold vs warm table\n")
        print("| tree, table | speedup | MAT |\n|---|---:|---:|")
        for label, params in (("widths 2,2,1,1, cold", {"tree": "widths"}), ("template (79 nodes), cold", {}),
                              ("template, warm (keep_table, second pass)", {"keep_table": True})):
            if params.get("keep_table"):
                TABLES.clear()
                timed("token_recycling", params)  # the first pass fills the table
            seconds, traces = timed("token_recycling", params)
            print(f"| {label} | {base / seconds:.2f}x | {mat(traces):.2f} |", flush=True)
        print()
    if "top_h" in parts:
        print("Top-H at alpha 0.4: kept-set size per step (the same seeds; each bound samples its own text)\n")
        print("| temperature | bound | median kept | mean kept |\n|---:|---|---:|---:|")
        for temperature in (1.0, 1.5):
            for bound in ("paper", "renormalised"):
                _, traces = timed("top_h", {"alpha": 0.4, "temperature": temperature, "bound": bound})
                kept = sorted(s.kept_count for t in traces for s in t.token_steps)
                print(f"| {temperature} | {bound} | {kept[len(kept) // 2]} | {sum(kept) / len(kept):.1f} |", flush=True)
        print()
    if "mirostat" in parts:
        print("Mirostat: observed surprise against the target tau (bits), per version\n")
        print("| tau | version | mean surprise | mean k (v1) |\n|---:|---|---:|---:|")
        for tau in (3.0, 5.0):
            for version in ("1", "2"):
                _, traces = timed("mirostat", {"tau": tau, "version": version})
                steps = [s for t in traces for s in t.token_steps]
                surprise = sum(s.details["surprise"] for s in steps) / len(steps)
                ks = [s.details["k"] for s in steps if "k" in s.details]
                k = f"{sum(ks) / len(ks):.0f}" if ks else "–"
                print(f"| {tau} | {version} | {surprise:.2f} | {k} |", flush=True)
        print()
    if "cautious" in parts:
        from explorer.events import TrialBranch

        print("CNTP with the authors' defaults (H_min 0.01, H_max 1.5, N_max 10)\n")
        seconds, traces = timed("cautious", {})
        branches = [e for t in traces for e in t.events if isinstance(e, TrialBranch)]
        steps = sum(len(t.token_steps) for t in traces)
        trials = [len(b.trials) for b in branches]
        lengths = [len(trial) for b in branches for trial in b.trials]
        print("| branched steps | tokens | mean trials per branch | mean trial length | longest trial | "
              "time vs greedy |\n|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(branches)} | {steps} | {sum(trials) / max(len(trials), 1):.1f} | "
              f"{sum(lengths) / max(len(lengths), 1):.1f} | {max(lengths, default=0)} | {seconds / base:.1f}x |")


if __name__ == "__main__":
    main()
