"""Diffusion decoding on the embedded (causal) model: the sampler's schedules and K/V reuse, in one process.

Usage: python benchmarks/bench_diffusion.py [--new-tokens 64] [--block 16] [--repeats 2] [--device cpu]
       python benchmarks/bench_diffusion.py --bidirectional [--model tiny-a2d]
Prints one row per configuration: denoising steps (= model passes), tokens per pass, positions recomputed per
step, wall time and tokens/s (median of the repeats), the speedup against the plain sampler (cache none, the
same schedule) and whether the tokens equal it. The embedded model is autoregressive: it reads the canvas
causally with the shift, so these numbers measure the sampler and the caches, not a diffusion LM's quality.
With --bidirectional the model reads the canvas both ways (an all-visible mask: how AR-to-diffusion models run,
though the embedded model was never trained so) and the caches become the papers' approximate caches: each cache
row also records the drift against a full pass at every step (drift_every=1; the extra pass is not counted): the
share of the open block's masked positions whose top-1 the cache changed, the mean |confidence difference|, and
the share of the run's committed tokens that differ from the no-cache run. `--model tiny-a2d` runs the same on a
tiny random AR-to-diffusion model built in code.
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
    parser.add_argument("--bidirectional", action="store_true", help="the caches' speed and drift, read both ways")
    parser.add_argument("--model", default="", help="'tiny-a2d': a tiny random AR-to-diffusion model (default: the "
                        "embedded model)")
    args = parser.parse_args()
    if args.model == "tiny-a2d":
        from explorer.testing import tiny_a2d_model

        lm = tiny_a2d_model(0, layers=4)
    else:
        lm = load_model(args.model or None, device=args.device)
    if args.bidirectional:
        return drift_table(lm, args)
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
        seconds, tokens, passes, recomputed, steps = measure(lm, strategy, params, args)
        results[name] = (seconds, tokens)
        new = sum(len(t) for t in tokens)
        base = results.get(baseline or "")
        speedup = f"{base[0] / seconds:.2f}x" if base and baseline != name else "1.00x" if baseline else "–"
        same = ("yes" if base[1] == tokens else "no") if base and baseline != name else "–"
        per_step = f"{recomputed / steps:.1f}" if steps else "–"
        print(f"| {name} | {passes} | {new / passes:.2f} | {per_step} | {seconds:.2f} | {new / seconds:.1f} | "
              f"{speedup} | {same} |")


def measure(lm, strategy: str, params: dict, args: argparse.Namespace
            ) -> tuple[float, list[list[int]], int, int, int]:
    """(median seconds over the repeats, the tokens per prompt, and from the first repeat: passes, positions
    recomputed, steps) of one configuration over PROMPTS."""
    times, outputs, passes, recomputed, steps = [], [], 0, 0, 0
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
    return statistics.median(times), outputs, passes, recomputed, steps


def drift_table(lm, args: argparse.Namespace) -> None:
    """The caches on a canvas read bidirectionally: speed against the no-cache sampler, and drift."""
    base = {"block_length": args.block, "attention": "bidirectional"}
    print(f"{lm.info.model_id} read bidirectionally; {args.new_tokens} new tokens, block {args.block}, "
          f"{len(PROMPTS)} prompts, median of {args.repeats}")
    print("| cache | passes | recomputed/step | seconds | speedup | top-1 changed | mean abs conf diff | "
          "tokens differing from no cache |")
    print("|---|---|---|---|---|---|---|---|")
    reference: tuple[float, list[list[int]]] | None = None
    for cache, extra in [("none", {}), ("prefix", {}), ("dual", {}), ("dkv", {}), ("dkv refresh 4", {"refresh": 4})]:
        params = {**base, "cache": cache.split()[0], **extra}
        seconds, outputs, passes, recomputed, steps = measure(lm, "diffusion", params, args)
        changed, compared, diffs = 0, 0, []
        for prompt in PROMPTS if cache != "none" else ():  # runs with the drift record (its extra passes cost time)
            drifted = run_to_end(lm, RunRequest.build("diffusion", {**params, "drift_every": 1}, prompt,
                                                      max_new_tokens=args.new_tokens))
            for event in (e for e in drifted.events if e.kind == "cache_drift"):
                pairs = list(zip(event.cached_ids, event.full_ids, strict=True))
                changed += sum(a != b for a, b in pairs)
                compared += len(pairs)
                diffs += [abs(a - b) for a, b in zip(event.cached_confidences, event.full_confidences, strict=True)]
        if reference is None:
            reference = (seconds, outputs)
        differing = sum(a != b for ours, theirs in zip(outputs, reference[1], strict=True)
                        for a, b in zip(ours, theirs, strict=False))
        total_tokens = sum(len(t) for t in reference[1])
        drift = (f"{changed / compared:.1%} | {statistics.fmean(diffs):.4f}" if compared else "– | –")
        print(f"| {cache} | {passes} | {recomputed / max(steps, 1):.1f} | {seconds:.2f} | "
              f"{reference[0] / seconds:.2f}x | {drift} | {differing / max(total_tokens, 1):.1%} |")


if __name__ == "__main__":
    main()
