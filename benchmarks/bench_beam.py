"""Our batched, recorded beam search vs transformers' `generate(num_beams=...)` on the embedded model.

Usage: python benchmarks/bench_beam.py [--beams 4] [--new-tokens 64] [--repeats 3]
Both run in this process on the same prompts; prints tokens/s, the median time ratio (ours / transformers,
lower is better; target <= 1.2) and whether the best sequences agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.events import BeamResult  # noqa: E402
from explorer.models import load_model  # noqa: E402
from explorer.request import RunRequest
from explorer.runner import run_to_end  # noqa: E402
from explorer.strategies import make_config  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash table works.",
    "What is the capital of Australia?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model(None, dtype="float32", device="cpu")
    config = make_config("beam", {"num_beams": args.beams, "num_return": 1})

    def hf(ids: list[int]) -> tuple[float, list[int]]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = lm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=args.beams,
                                max_new_tokens=args.new_tokens)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    def ours(prompt: str) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        trace = run_to_end(lm, RunRequest("beam", config, prompt, chat=True, max_new_tokens=args.new_tokens))
        result = next(e for e in trace.events if isinstance(e, BeamResult))
        return time.perf_counter() - t0, result.hypotheses[0]

    ours(PROMPTS[0])
    hf(lm.encode_prompt(PROMPTS[0], chat=True))
    print(f"embedded SmolLM2-135M-Instruct, cpu fp32, {torch.get_num_threads()} threads, beams={args.beams}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("| prompt | tokens | transformers s | ours s | ratio ours/transformers | same best sequence |")
    print("|---|---:|---:|---:|---:|---|")
    ratios = []
    for prompt in PROMPTS:
        ids = lm.encode_prompt(prompt, chat=True)
        theirs = [hf(ids) for _ in range(args.repeats)]
        mine = [ours(prompt) for _ in range(args.repeats)]
        t_hf, t_ours = statistics.median(t for t, _ in theirs), statistics.median(t for t, _ in mine)
        pad = lm.tokenizer.pad_token_id
        ref = theirs[0][1]
        got = mine[0][1]
        same = ref[:len(got)] == got and all(t == pad for t in ref[len(got):])
        ratios.append(t_ours / t_hf)
        print(f"| {prompt[:40]} | {len(got)} | {t_hf:.2f} | {t_ours:.2f} | {t_ours / t_hf:.2f}x | {same} |")
    print(f"median ratio ours / transformers: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
