"""Quality on the embedded model: the samplers and the search methods the seed papers compare on quality, at two
temperatures, with 95 % intervals (explorer.quality; README "Quality, diversity and task success").

Usage: python benchmarks/bench_quality.py [--prompts assets/prompts.jsonl] [--limit 3] [--seeds 3]
       [--new-tokens 48] [--temperatures 0.7,1.0] [--db sqlite:///quality.sqlite] [--out report/]
The stochastic methods run every prompt with `--seeds` seeds at each temperature; the deterministic ones (greedy,
beam, contrastive, momentum) once per prompt (their seeds would repeat the same text). Each configuration's
numbers are mean ± 95 % Student-t interval over its runs (prompts x seeds); self-BLEU-4 is among its runs (so it
mixes prompts: lower = more varied outputs overall). MAUVE needs reference texts and is left out here. The last
column is tokens/s against greedy's in the same process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.export import quality_markdown  # noqa: E402
from explorer.metrics import quality_table  # noqa: E402
from explorer.models import load_model, warm_up  # noqa: E402
from explorer.sweep import load_prompts, parse_strategies, run_sweep  # noqa: E402
from store import Store  # noqa: E402

DETERMINISTIC = "greedy; beam:num_beams=4; contrastive:top_k=4,alpha=0.6; momentum"


def stochastic(t: str) -> str:
    """The samplers (greedy aside) and the sampling search methods at temperature `t`."""
    return "; ".join([
        f"sample:temperature={t}", f"sample:temperature={t},top_p=0.9", f"sample:temperature={t},min_p=0.1",
        f"top_h:temperature={t}", f"mirostat:temperature={t}", f"sample:temperature={t},typical_p=0.9",
        f"sample:temperature={t},eta_cutoff=0.0009", f"mbr:samples=8,temperature={t}",
        f"first_finish:samples=4,temperature={t}", f"cautious:temperature={t}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(ROOT / "assets" / "prompts.jsonl"))
    parser.add_argument("--limit", type=int, default=3, help="the first N prompts")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--db", default=None, help="keep the runs here (default: a temporary database)")
    parser.add_argument("--out", default=None, help="also write the report (tables and figures) here")
    args = parser.parse_args()

    items = load_prompts(args.prompts)[:args.limit]
    lm = load_model(None, dtype="float32", device="cpu")
    warm_up(lm)
    store = Store(args.db or f"sqlite:///{Path(tempfile.mkdtemp()) / 'quality.sqlite'}")
    started = time.perf_counter()
    groups = [(parse_strategies(DETERMINISTIC), 1)]
    groups += [(parse_strategies(stochastic(t.strip())), args.seeds) for t in args.temperatures.split(",")]
    for methods, seeds in groups:
        for method in methods:
            report = run_sweep(lm, items, [method], seeds, store, max_new_tokens=args.new_tokens, chat=True)
            print(f"{method.label}: {report.done} runs, {report.skipped} kept, {len(report.failed)} failed "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            for what, error in report.failed:
                print(f"  failed: {what}: {error}", file=sys.stderr)
    traces = store.load_traces(store.run_ids())
    table = quality_table(traces)
    base = table.get("greedy", {}).get("tokens_per_s")
    print(f"\n{len(items)} prompts of {Path(args.prompts).name}, {args.seeds} seeds per stochastic configuration, "
          f"{args.new_tokens} new tokens, {lm.info.model_id} (fp32, CPU); {len(traces)} runs in "
          f"{time.perf_counter() - started:.0f} s\n")
    print(quality_markdown(table))
    if base:
        print("tokens/s against greedy: " + ", ".join(
            f"{method} {row['tokens_per_s'][0] / base[0]:.2f}x" for method, row in table.items()
            if row.get("tokens_per_s")))
    if args.out:
        from explorer.sweep import write_report

        for path in write_report(traces, args.out, formats=("svg", "png")):
            print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
