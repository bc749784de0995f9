"""Diffusion decoding on the embedded (causal) model: the sampler's schedules and K/V reuse, in one process.

Usage: python benchmarks/bench_diffusion.py [--new-tokens 64] [--block 16] [--repeats 2] [--device cpu]
Prints one row per configuration: denoising steps (= model passes), tokens per pass, positions recomputed per
step, wall time and tokens/s (median of the repeats), the speedup against the plain sampler (cache none, the
same schedule) and whether the tokens equal it. The embedded model is autoregressive: it reads the canvas
causally with the shift, so these numbers measure the sampler and the caches, not a diffusion LM's quality.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.models import load_model  # noqa: E402
from explorer.request import RunRequest  # noqa: E402
from explorer.runner import run_to_end  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works, with an example in Python.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lm = load_model(None, device=args.device)
    block = {"block_length": args.block}
    rows = [("greedy (autoregressive)", "greedy", {}, None)]
    for name, params in [("diffusion", block), ("diffusion threshold 0.9", {**block, "threshold": 0.9}),
                         ("prophet", block), ("credit_decoding", block), ("localleap", block),
                         ("adablock", block), ("eoser (ASS)", {}), ("window_diffusion W=16 B=32", {})]:
        strategy = name.split()[0]
        rows.append((name, strategy, params, name))
        if name == "diffusion":
            rows += [(f"diffusion cache={cache}", strategy, {**params, "cache": cache}, name)
                     for cache in ("prefix", "dual", "dkv")]
    results: dict[str, tuple[float, list[list[int]]]] = {}
    print(f"{args.new_tokens} new tokens, block {args.block}, {len(PROMPTS)} prompts, median of {args.repeats}")
    print("| configuration | passes | tokens/pass | recomputed/step | seconds | tok/s | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, strategy, params, baseline in rows:
        times, tokens, passes, recomputed, steps = [], [], 0, 0, 0
        for repeat in range(args.repeats):
            total, outputs = 0.0, []
            for prompt in PROMPTS:
                request = RunRequest.build(strategy, params, prompt, max_new_tokens=args.new_tokens)
                t0 = time.perf_counter()
                trace = run_to_end(lm, request)
                total += time.perf_counter() - t0
                outputs.append(trace.token_ids)
                if repeat == 0:
                    passes += trace.finished.target_forward_passes
                    unmasking = [e for e in trace.events if e.kind == "unmask_step"]
                    recomputed += sum(len(e.recomputed) for e in unmasking)
                    steps += len(unmasking)
            times.append(total)
            tokens = outputs
        seconds = statistics.median(times)
        results[name] = (seconds, tokens)
        new = sum(len(t) for t in tokens)
        base = results.get(baseline or "")
        speedup = f"{base[0] / seconds:.2f}x" if base and baseline != name else "1.00x" if baseline else "–"
        same = ("yes" if base[1] == tokens else "no") if base and baseline != name else "–"
        per_step = f"{recomputed / steps:.1f}" if steps else "–"
        print(f"| {name} | {passes} | {new / passes:.2f} | {per_step} | {seconds:.2f} | {new / seconds:.1f} | "
              f"{speedup} | {same} |")


if __name__ == "__main__":
    main()
