"""The GPU path, measured on randomly initialised models of real sizes (timings only, never acceptance).

Usage: python benchmarks/bench_gpu.py [--shapes llama-3.2-1b,qwen2.5-7b,llama-3-8b] [--new-tokens 128]
                                      [--prompt-tokens 128] [--ks 1,2,4,8,16,32,64] [--check] [--device cuda]

For each model shape (built from a config in code: no download, no Hub; random weights give real timings
and meaningless text) it prints:
  - decode: ms per token of one-token decoding on the KV cache (model forward only, argmax kept on the GPU);
  - verify: the cost of one forward over k new tokens, as a chain (causal) and as a tree (tree attention
    mask, a binary tree of k nodes), relative to one token, for each k in --ks;
  - greedy: tokens/s of transformers' `generate` (greedy), of our bare loop (the same KV-cached forward and
    an argmax read back each step, nothing recorded) and of our recorded greedy (the runner and the greedy
    strategy: top-10 raw and kept distributions, entropy and rank per step, TokenStep events and the trace;
    no database); recording overhead = recorded / bare per-step time - 1, and ours / generate.
With --check it first runs every strategy (default parameters plus the variants below) on a tiny random
Llama on the GPU in float32 and bfloat16, and checks that each greedy-rule draft-verify method is
token-identical to greedy there (up to ties in bfloat16, as on CPU).

It needs only torch and transformers (and the repo): no gradio, plotly or SQLAlchemy is imported. Without a
CUDA GPU it says so and exits 0 (pass --device cpu --shapes tiny to try the script itself on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Real shapes (public configs' numbers); weights are random.
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         rope_theta=500000.0, tie_word_embeddings=True, head_dim=64)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       rope_theta=1000000.0, tie_word_embeddings=False)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       rope_theta=500000.0, tie_word_embeddings=False)),
}
# Strategies run by --check beyond their defaults (the variants whose code paths differ).
VARIANTS: list[tuple[str, dict]] = [
    ("prompt_lookup", {"min_ngram": 1}), ("self_speculative", {"search": "rank"}),
    ("tree_speculative", {"mode": "dynamic"}), ("tree_speculative", {"mode": "topk"}),
    ("token_recycling", {"tree": "widths"}), ("jacobi", {"variant": "blocks"}),
    ("speculative", {"rule": "sampling"}), ("tree_speculative", {"rule": "sampling"}),
    ("mirostat", {"version": 1}),
]
GREEDY_RULE = ("prompt_lookup", "speculative", "self_speculative", "tree_speculative", "lookahead",
               "token_recycling", "jacobi")


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with `vocab_size` entries ("t0", "t1", ...): real ids over a real-sized
    vocabulary, no download. No end-of-sequence token: every run decodes its full budget."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A `LanguageModel` of `shape` with random weights, built on the device in `dtype`."""
    import transformers

    from explorer.models import LanguageModel, ModelInfo

    config_class, settings = SHAPES[shape]
    config = getattr(transformers, config_class)(max_position_embeddings=8192, bos_token_id=None,
                                                 eos_token_id=None, pad_token_id=0, **settings)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(model_id=f"random-{shape}", weights_hash=f"random:{shape}", dtype=str(dtype).split(".")[-1],
                     device=str(device))
    return LanguageModel(model=model, tokenizer=word_tokenizer(config.vocab_size), info=info), params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, inner: int = 1) -> float:
    """Seconds of one call of `fn` (the mean of `inner` calls in a row), the GPU synchronised around them."""
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - start) / inner


def interleaved(fns: dict, device: torch.device, repeats: int, inner: int = 1) -> dict:
    """Median seconds per call of each of `fns`, measured in turn within every repeat (after a warm-up of each),
    so that a slow spell of the machine weighs on all of them alike."""
    for fn in fns.values():
        fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device, inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def binary_tree(k: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, k)]


@torch.inference_mode()
def measure(shape: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from explorer.recorder import Recorder
    from explorer.request import RunRequest
    from explorer.runner import run_strategy
    from explorer.strategies.base import commit_token

    lm, params = random_model(shape, device, dtype)
    vocab = lm.model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, vocab, (args.prompt_tokens,), generator=gen).tolist()
    prompt_text = " ".join(f"t{i}" for i in prompt_ids)
    n = args.new_tokens
    row: dict = {"shape": shape, "params_b": params / 1e9}

    # decode: ms per token, forward only (argmax stays on the device).
    def decode() -> None:
        session = lm.session()
        token = session.forward(prompt_ids, all_logits=False).logits[-1].argmax().reshape(1)
        for _ in range(n):
            token = session.forward(token, all_logits=False).logits[-1].argmax().reshape(1)

    def prefill_only() -> None:
        lm.session().forward(prompt_ids, all_logits=False)

    times = interleaved({"decode": decode, "prefill": prefill_only}, device, args.repeats)
    row["decode_ms"] = (times["decode"] - times["prefill"]) / n * 1000

    # verify: one forward over k new tokens on a cached prompt, chain and tree, each against one token measured
    # beside it (10 passes in a row per sample).
    session = lm.session()
    session.forward(prompt_ids, all_logits=False)
    base = session.length
    block = torch.randint(1, vocab, (max(args.ks),), generator=gen).tolist()

    def verify(k: int, tree: bool):
        def once() -> None:
            session.forward(block[:k], parents=binary_tree(k) if tree else None)
            session.crop(base)
        return once

    row["chain"], row["tree"] = {}, {}
    for k in args.ks:
        times = interleaved({"one": verify(1, False), "chain": verify(k, False), "tree": verify(k, True)}, device,
                            args.repeats, inner=10)
        row["verify_one_ms"] = times["one"] * 1000
        row["chain"][k], row["tree"][k] = times["chain"] / times["one"], times["tree"] / times["one"]

    # recording alone: the TokenStep of one step (stats on the device, one transfer, the pieces' texts).
    logits = session.forward(block[:1]).logits[-1]
    session.crop(base)
    token = int(logits.argmax())
    row["record_ms"] = timed(lambda: commit_token(lm, 0, base, token, logits), device, inner=200) * 1000

    # greedy: generate vs our bare loop vs our recorded greedy, in turn.
    ids = torch.tensor([prompt_ids], device=device)

    def hf() -> None:
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)
        assert out.shape[1] - ids.shape[1] == n

    def bare() -> None:
        session = lm.session()
        token = int(session.forward(prompt_ids, all_logits=False).logits[-1].argmax())
        for _ in range(n - 1):
            token = int(session.forward([token], all_logits=False).logits[-1].argmax())

    request = RunRequest.build("greedy", {}, prompt_text, chat=False, max_new_tokens=n)

    def recorded() -> None:
        events = list(run_strategy(lm, request, recorder=Recorder()))
        assert events[-1].new_tokens == n, events[-1]

    times = interleaved({"hf": hf, "bare": bare, "ours": recorded}, device, args.repeats)
    row["hf_s"], row["bare_s"], row["ours_s"] = times["hf"], times["bare"], times["ours"]
    session.crop(0)  # (the model goes with this frame; free its cache first)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check_strategies(device: torch.device) -> bool:
    """Every strategy on a tiny random Llama on `device`; greedy-rule methods against greedy there."""
    import dataclasses

    from explorer.metrics import lossless_check
    from explorer.request import RunRequest
    from explorer.runner import run_to_end
    from explorer.strategies import REGISTRY
    from explorer.testing import tiny_architecture

    prompt = "the cat sat on the mat. the cat sat on the"
    runs = [(name, {}) for name in REGISTRY] + VARIANTS
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        lm = tiny_architecture("llama", seed=3)
        lm.model.to(device=device, dtype=dtype)
        lm = dataclasses.replace(lm, info=dataclasses.replace(lm.info, dtype=str(dtype).split(".")[-1],
                                                              device=str(device)))
        print(f"\n{str(dtype).split('.')[-1]} on {device}:")
        try:
            greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=32, chat=False))
        except Exception as error:
            print(f"  greedy FAILED: {type(error).__name__}: {error}")
            ok = False
            continue
        for name, params in runs:
            try:
                trace = run_to_end(lm, RunRequest.build(name, params, prompt, max_new_tokens=32, chat=False))
            except Exception as error:  # report every failure, not only the first
                print(f"  {name:18} {params!s:28} FAILED: {type(error).__name__}: {error}")
                ok = False
                continue
            verdict = ""
            if name in GREEDY_RULE and params.get("rule", "greedy") == "greedy":
                verdict = lossless_check(trace, greedy).status
                allowed = ("identical",) if dtype == torch.float32 else ("identical", "tie")
                ok &= verdict in allowed
            print(f"  {name:18} {params!s:28} {trace.finished.status:9} {len(trace.token_ids):3} tokens, "
                  f"{trace.finished.target_forward_passes:3} passes {verdict}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,qwen2.5-7b,llama-3-8b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--ks", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--check", action="store_true", help="run every strategy on the device first")
    args = parser.parse_args()
    args.ks = sorted({int(k) for k in args.ks.split(",")} | {1})
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (run this where one is present)")
        return 0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import transformers
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; {args.dtype}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    ok = check_strategies(device) if args.check else True
    rows = [measure(shape, args, device, dtype) for shape in args.shapes.split(",")]

    print("\n| shape | params | decode ms/token | recording ms/step | generate tok/s | bare loop tok/s "
          "| recorded greedy tok/s | recording overhead | ours / generate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = args.new_tokens
        overhead = r["ours_s"] / r["bare_s"] - 1
        print(f"| {r['shape']} | {r['params_b']:.2f} B | {r['decode_ms']:.2f} | {r['record_ms']:.3f} | "
              f"{n / r['hf_s']:.1f} | "
              f"{n / r['bare_s']:.1f} | {n / r['ours_s']:.1f} | {overhead:+.1%} | {r['hf_s'] / r['ours_s']:.2f}x |")
    for kind in ("chain", "tree"):
        print(f"\nverifying k tokens in one forward ({kind}), cost relative to one token:")
        print("| shape | 1 token ms | " + " | ".join(f"k={k}" for k in args.ks) + " |")
        print("|---|---|" + "---|" * len(args.ks))
        for r in rows:
            print(f"| {r['shape']} | {r['verify_one_ms']:.2f} | "
                  + " | ".join(f"{r[kind][k]:.2f}x" for k in args.ks) + " |")
    if not ok:
        print("\nsome strategy failed or lost greedy's tokens on the device (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
