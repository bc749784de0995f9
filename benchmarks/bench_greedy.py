"""Recorded greedy vs transformers' `generate` (greedy) on the embedded model, in one process.

Usage: python benchmarks/bench_greedy.py [--new-tokens 128] [--repeats 3] [--device cpu]
Prints a table (tokens/s, median of the repeats) and the ratio ours / generate. Our runs record every step
(top-10 raw and kept distributions, entropy, rank) and write them to a SQLite database in batches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.models import load_model  # noqa: E402
from explorer.recorder import Recorder  # noqa: E402
from explorer.request import RunRequest
from explorer.runner import run_to_end  # noqa: E402
from explorer.strategies import make_config  # noqa: E402
from store import Store  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works, with an example in Python.",
    "Describe the water cycle to a ten-year-old.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lens", action="store_true", help="also record the logit lens (issue 17)")
    parser.add_argument("--attention", action="store_true", help="also record attention (issue 17)")
    args = parser.parse_args()

    lm = load_model(None, dtype=args.dtype, device=args.device)
    store = Store(f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite")
    config = make_config("greedy", {})

    def sync() -> None:
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    def hf(prompt_ids: list[int]) -> tuple[float, int]:
        ids = torch.tensor([prompt_ids], device=lm.device)
        sync()
        t0 = time.perf_counter()
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.new_tokens)
        sync()
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    def ours(prompt: str) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        trace = run_to_end(lm, RunRequest("greedy", config, prompt, chat=True, max_new_tokens=args.new_tokens,
                                          lens=args.lens, attention=args.attention), recorder=Recorder(store))
        sync()
        return time.perf_counter() - t0, len(trace.token_ids)

    prompt_ids = [lm.encode_prompt(p, chat=True) for p in PROMPTS]
    hf(prompt_ids[0])  # warm-up both paths
    ours(PROMPTS[0])
    rows = []
    for prompt, ids in zip(PROMPTS, prompt_ids, strict=True):
        hf_runs = [hf(ids) for _ in range(args.repeats)]
        our_runs = [ours(prompt) for _ in range(args.repeats)]
        hf_tps = statistics.median(n / t for t, n in hf_runs)
        our_tps = statistics.median(n / t for t, n in our_runs)
        rows.append((prompt[:40], hf_runs[0][1], hf_tps, our_tps, our_tps / hf_tps))

    print(f"device={lm.info.device} dtype={lm.info.dtype} threads={torch.get_num_threads()} "
          f"new_tokens<={args.new_tokens} repeats={args.repeats} (median) lens={args.lens} "
          f"attention={args.attention}")
    print("| prompt | tokens | generate tok/s | recorded greedy tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for prompt, n, a, b, r in rows:
        print(f"| {prompt}… | {n} | {a:.1f} | {b:.1f} | {r:.2f}x |")
    overall = statistics.median(r[4] for r in rows)
    print(f"median ratio recorded greedy / generate: {overall:.2f}x")


if __name__ == "__main__":
    main()
