"""Self-distillation data for draft heads: chat prompts made on this machine, the target's own answers to them.

A draft head must predict what *this* target writes after a chat prompt, so its training data is the target's own
answers (as HASS and EAGLE's re-generated data use) to prompts spread over the kinds of request the app sees
(input-grounded rewriting and extraction, questions, writing, code). Nothing is downloaded:
- subjects: a fixed list of everyday and technical subjects (below);
- questions: the target itself writes questions about each subject (sampled: self-instruct, Wang et al. 2023);
- texts to rewrite, summarise or extract from: short reports the target writes about a subject (sampled), and
  paragraphs of the Python standard library's docstrings;
- code: requests made from standard-library functions (their docstring's first sentence; their source, to
  annotate or explain);
- optionally a question file in Spec-Bench's format (`--questions`, e.g. Spec-Bench's question.jsonl; every turn
  becomes a prompt).
The benchmark's prompt set (assets/prompts.jsonl) is never used, and a prompt equal to one of its prompts is
dropped, so `benchmarks/bench_speculative.py` measures heads on prompts they were not trained on.
Answers: greedy (what the benchmark decodes) plus `samples` answers drawn at `temperature` per prompt (more
contexts of the same distribution; the labels are the target's argmax at each position either way). Written as
one .npz: token ids (prompt + answer), sequence offsets, the first answer position, and with `features` the
target's features (fp16) and argmax read off the generation's own passes.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.ngram import stdlib_docstrings

SUBJECTS = (
    "baking bread", "the water cycle", "volcanoes", "saving money", "learning a new language", "the Roman Empire",
    "black holes", "healthy sleep", "electric cars", "climate change", "the human heart", "job interviews",
    "gardening tomatoes", "the French Revolution", "machine learning", "recycling", "chess openings",
    "the immune system", "public speaking", "renting an apartment", "ancient Egypt", "solar panels", "time zones",
    "coffee", "marathon training", "the stock market", "vaccines", "honeybees", "the moon landing", "earthquakes",
    "writing a resume", "photography", "the printing press", "dinosaurs", "first aid", "inflation", "the ocean tides",
    "social media", "meditation", "camping", "the periodic table", "World War I", "birds migrating", "rainforests",
    "credit cards", "the Internet", "cooking pasta", "the Olympic Games", "plate tectonics", "remote work",
    "friendship", "the Renaissance", "nutrition labels", "bicycles", "the speed of light", "a birthday party",
    "moving to a new city", "pets", "the history of jazz", "smartphones", "passwords and security", "the Great Wall",
    "antibiotics", "composting", "the solar system", "a job promotion", "volunteering", "the Amazon river", "robots",
    "board games", "a school science fair", "traffic jams", "the metric system", "electricity at home", "deserts",
    "the human brain", "opening a small business", "knitting", "sharks", "the Industrial Revolution", "airplanes",
    "studying for exams", "a wedding", "mountains", "democracy", "tea ceremonies", "DNA", "a lost wallet",
    "snowstorms", "the library", "a rainy weekend", "origami", "hiking safety", "wind energy", "museums", "a garden",
    "sorting algorithms", "databases", "Python lists", "web browsers", "unit testing", "recursion", "spreadsheets",
    "email etiquette", "the game of football", "music lessons", "a broken laptop", "a train journey", "a picnic",
    "an old lighthouse", "a robot learning to paint", "a cat who runs a bakery", "a talking tree", "a lost astronaut",
    "a small village festival", "a detective and a missing key", "a time traveller", "a shy giant", "pirates",
)
QUESTION_ASK = "Write one question that a curious person might ask about {s}. Reply with the question only."
REPORT_ASK = "Write a short news report of about five sentences about {s}. Use names, places and numbers."
WRITING = ("Write a short story about {s}.", "Write a poem about {s}.", "Write a short blog post about {s}.",
           "Write an email to a colleague about {s}.", "Write a letter to a friend about {s}.",
           "Give five tips about {s}.", "Explain {s} to a ten-year-old.", "What are the pros and cons of {s}?",
           "Write a dialogue between two friends about {s}.", "Describe {s} in one paragraph.")
GROUNDED = ("Rewrite the following text in a more formal tone:\n\n{t}", "Summarize the text below in two "
            "sentences.\n\n{t}", "From the text below, list every name, place and number it mentions.\n\n{t}",
            "Rewrite the following text in simpler words:\n\n{t}", "Turn the text below into a bulleted list of "
            "its main points.\n\n{t}", "Answer in one sentence: what is the text below about?\n\n{t}",
            "Translate the following text into French:\n\n{t}", "Write three questions about the text below.\n\n{t}")
CODE = ("Write a Python function that {d} Include a docstring.", "How would you write code in Python that {d}",
        "Write a Python function that {d} Give a short example of its use.")
CODE_SOURCE = ("Add type hints and a docstring to this Python function, and return the whole function:\n\n{c}",
               "Explain what this Python function does:\n\n{c}", "Write unit tests with pytest for this Python "
               "function:\n\n{c}", "Find a possible bug or improvement in this Python code:\n\n{c}")


def benchmark_prompts() -> set[str]:
    path = Path(__file__).resolve().parents[1] / "assets" / "prompts.jsonl"
    return {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}


@functools.cache
def stdlib_functions(limit: int = 4000) -> tuple[tuple[str, str], ...]:
    """(first docstring sentence, source) of short standard-library functions."""
    out = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.end_lineno \
                    and 3 <= node.end_lineno - node.lineno <= 25:
                doc = ast.get_docstring(node)
                code = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
                if doc:
                    sentence = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
                    if 20 <= len(sentence) <= 160:
                        out.append((sentence[0].lower() + sentence[1:] + ".", code))
        if len(out) >= limit:
            break
    return tuple(out)


def question_file(path: str | Path) -> list[str]:
    """Every turn of every question in a Spec-Bench-format file (`{"turns": [...]}` per line)."""
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts += [t for t in json.loads(line).get("turns", []) if isinstance(t, str) and t.strip()]
    return prompts


@torch.no_grad()
def generate(model: Any, prompts: list[str], *, max_new_tokens: int, batch: int, temperature: float = 0.0,
             seed: int = 0, progress: Any = None, features: bool = False) -> list[tuple[Any, ...]]:
    """(prompt ids through the chat template, answer ids up to and with the first end token) per prompt, in
    batches (left-padded); greedy at temperature 0, else sampled. With `features`, also the target's features
    f_j (its last hidden state, fp16) and argmax at every position but the answer's last, read off the
    generation's own passes (no second, teacher-forced pass: on a CPU that halves the cost)."""
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(seed)
    encoded = [model.encode_prompt(p, chat=True) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    out: list[Any] = [None] * len(encoded)
    weight = model.model.get_output_embeddings().weight
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in rows], device=model.device)
        mask = (torch.arange(width, device=model.device)[None] >= torch.tensor(
            [width - len(encoded[i]) for i in rows], device=model.device)[:, None]).long()
        options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else \
            {"do_sample": False}
        if features:
            options.update(output_hidden_states=True, return_dict_in_generate=True, output_scores=bool(temperature))
        result = model.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                      **options)
        generated = (result.sequences if features else result)[:, width:].tolist()
        for row, (i, answer) in enumerate(zip(rows, generated, strict=True)):
            ends = [k for k, t in enumerate(answer) if t in model.eos_token_ids]
            answer = answer[: ends[0] + 1] if ends else answer
            if not features:
                out[i] = (encoded[i], answer)
                continue
            n = len(encoded[i])
            prompt_f = result.hidden_states[0][-1][row, width - n:]
            answer_f = [result.hidden_states[t][-1][row, 0] for t in range(1, len(answer))]
            f = torch.cat([prompt_f, torch.stack(answer_f)]) if answer_f else prompt_f
            prompt_argmax = (prompt_f @ weight.T).argmax(-1)
            answer_argmax = (torch.stack([result.scores[t][row] for t in range(1, len(answer))]).argmax(-1)
                             if temperature and len(answer) > 1 else torch.tensor(answer[1:], dtype=torch.long))
            out[i] = (encoded[i], answer, f.half().cpu(), torch.cat([prompt_argmax.cpu(), answer_argmax.cpu()]))
        if progress is not None:
            progress.update(len(rows))
    return out


def make_prompts(model: Any, *, count: int, batch: int = 64, questions: str | Path | None = None, seed: int = 0,
                 progress: bool = True) -> list[str]:
    """About `count` prompts of the four kinds (see the module docstring); the target writes the questions and
    the reports itself."""
    rng = random.Random(seed)
    per_kind = max(1, count // 4)
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(per_kind)]
    bar = _bar(progress, 2 * per_kind, "writing questions and texts")
    asked = generate(model, [QUESTION_ASK.format(s=s) for s in subjects], max_new_tokens=48, batch=batch,
                     temperature=1.0, seed=seed, progress=bar)
    reports = generate(model, [REPORT_ASK.format(s=s) for s in subjects], max_new_tokens=160, batch=batch,
                       temperature=0.9, seed=seed + 1, progress=bar)
    if bar is not None:
        bar.close()
    text = model.tokenizer.decode
    qa = [q for q in (text(a, skip_special_tokens=True).strip().split("\n")[0] for _, a in asked)
          if 12 <= len(q) <= 300]
    writing = [rng.choice(WRITING).format(s=rng.choice(SUBJECTS)) for _ in range(per_kind)]
    passages = [text(a, skip_special_tokens=True).strip() for _, a in reports]
    passages += [d.split("\n\n")[0] for d in stdlib_docstrings() if 200 <= len(d.split("\n\n")[0]) <= 900]
    rng.shuffle(passages)
    grounded = [rng.choice(GROUNDED).format(t=t) for t in passages[:per_kind] if len(t) >= 80]
    functions = list(stdlib_functions())
    rng.shuffle(functions)
    code = [rng.choice(CODE).format(d=d) if i % 2 else rng.choice(CODE_SOURCE).format(c=c)
            for i, (d, c) in enumerate(functions[:per_kind])]
    prompts = qa + writing + grounded + code + (question_file(questions) if questions else [])
    hidden = benchmark_prompts()
    prompts = list(dict.fromkeys(p for p in prompts if p not in hidden))
    rng.shuffle(prompts)
    return prompts


def self_distill(model: Any, out: str | Path, *, prompts: int = 2000, samples: int = 1, temperature: float = 0.7,
                 max_new_tokens: int = 256, batch: int = 64, questions: str | Path | None = None, seed: int = 0,
                 features: bool = False, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Write the data set (see the module docstring) to `out` (.npz); returns its description. With `features`,
    the target's features and argmax are stored too (fp16, from the generation's own passes), so training needs
    no target pass: the choice for a CPU."""
    asks = make_prompts(model, count=prompts, batch=batch, questions=questions, seed=seed, progress=progress)
    passes = [0.0] + [temperature] * samples
    bar = _bar(progress, len(asks) * len(passes), "answering")
    rows = []
    for k, t in enumerate(passes):
        rows += generate(model, asks, max_new_tokens=max_new_tokens, batch=batch, temperature=t, seed=seed + 7 + k,
                         progress=bar, features=features)
    if bar is not None:
        bar.close()
    rows = [r for r in rows if len(r[1]) > 1]
    record = {"prompts": len(asks), "answers_per_prompt": len(passes), "temperature": temperature,
              "max_new_tokens": max_new_tokens, "sequences": len(rows), "answer_tokens": sum(len(r[1]) for r in rows),
              "target_model": model.info.model_id, "target_weights_hash": model.info.weights_hash,
              "questions_file": Path(questions).name if questions else None, "seed": seed, "features": features,
              "command": command}
    if features:  # the answer's last token has no feature (it was never fed): the sequence ends before it
        sequences = [r[0] + r[1][:-1] for r in rows]
        extra = {"features": torch.cat([r[2] for r in rows]).numpy(), "argmax": torch.cat([r[3] for r in rows]).numpy()}
    else:
        sequences, extra = [r[0] + r[1] for r in rows], {}
    write_data(out, sequences, [len(r[0]) - 1 for r in rows], record, extra)
    return record


def write_data(out: str | Path, sequences: list[list[int]], first: list[int], record: dict[str, Any],
               extra: dict[str, Any]) -> None:
    """One .npz: token ids, sequence offsets, the first trained position per sequence, the record, and `extra`
    (features, argmax)."""
    record["tokens"] = sum(len(s) for s in sequences)
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    np.savez(out, tokens=np.fromiter((t for s in sequences for t in s), dtype=np.uint32), offsets=offsets,
             first=np.asarray(first, dtype=np.int64), record=json.dumps(record), **extra)


TEXT_SUFFIXES = (".txt", ".md", ".rst")


def text_files(sources: list[str | Path]) -> list[Path]:
    """The text files named, and those below the folders named (.txt, .md, .rst), in a fixed order."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        elif source.is_file():
            files.append(source)
        else:
            raise ValueError(f"--text {source}: no such file or folder")
    if not files:
        raise ValueError("--text: no .txt, .md or .rst files found there")
    return files


@torch.no_grad()
def text_data(model: Any, out: str | Path, sources: list[str | Path], *, tokens: int, licence: str, chunk: int = 256,
              batch: int = 16, seed: int = 0, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Teacher-forced chunks of local text (`tokens` tokens in all, `chunk` each) with the target's features and
    argmax, written like `self_distill`'s data. With soft labels (the target's own distribution at every position,
    computed from the stored features while training) any text teaches the head the target's behaviour, at
    prefill speed. Chunks are drawn from the files in a seeded order; a file holding one of the benchmark's
    prompts is skipped, so the benchmark stays held out."""
    files = text_files(sources)
    random.Random(seed).shuffle(files)
    hidden = benchmark_prompts()
    stream: list[int] = []
    used: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200 or any(prompt in text for prompt in hidden):
            continue
        stream += model.tokenizer(text, add_special_tokens=False)["input_ids"]
        used.append(str(path))
        if len(stream) >= tokens:
            break
    chunks = [stream[i:i + chunk] for i in range(0, min(len(stream), tokens) - chunk + 1, chunk)]
    if not chunks:
        raise ValueError(f"--text: fewer than {chunk} tokens of text found")
    bar = _bar(progress, len(chunks), "teacher-forcing text")
    features, argmax = [], []
    for start in range(0, len(chunks), batch):
        ids = torch.tensor(chunks[start:start + batch], device=model.device)
        result = model.model(input_ids=ids, output_hidden_states=True)
        features += list(result.hidden_states[-1].half().cpu())  # (chunk, hidden) each: normed, as generation's
        argmax += list(result.logits.argmax(-1).cpu())
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    record = {"text_files": len(used), "text_sources": [str(s) for s in sources], "licence": licence,
              "chunk": chunk, "sequences": len(chunks), "answer_tokens": 0, "prompts": 0, "seed": seed,
              "target_model": model.info.model_id, "target_weights_hash": model.info.weights_hash,
              "features": True, "command": command}
    write_data(out, chunks, [0] * len(chunks), record,
               {"features": torch.cat(features).numpy(), "argmax": torch.cat(argmax).numpy()})
    return record


def load_sequences(path: str | Path) -> tuple[list[tuple[torch.Tensor, ...]], list[int], dict[str, Any]]:
    """(per sequence: token ids, features or None, argmax or None; the first answer position per sequence; the
    data set's record)."""
    with np.load(path) as data:
        tokens, offsets = torch.from_numpy(data["tokens"].astype(np.int64)), data["offsets"]
        first, record = data["first"].tolist(), json.loads(str(data["record"]))
        features = torch.from_numpy(data["features"]) if "features" in data else None
        argmax = torch.from_numpy(data["argmax"].astype(np.int64)) if "argmax" in data else None
    return [(tokens[a:b], None if features is None else features[a:b], None if argmax is None else argmax[a:b])
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)], first, record


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt")
