"""The Hugging Face dataset export: every table loads offline through `datasets.load_dataset` as its own config,
values round-trip, the card's YAML is safe whatever the prompts hold, and foreign folders are never written."""

import json
import math

import pytest
import yaml

from explorer.dataset import TABLES, is_our_export, push_to_hub, write_dataset
from explorer.events import DraftRound, RunFinished, RunStarted, TokenStep, UnmaskStep
from explorer.trace import Trace

datasets = pytest.importorskip("datasets")

HOSTILE_PROMPT = 'a "quoted" prompt\n---\nconfigs: []\nlicense: mit\n```\n<script>x()</script>\n---\n'


def started(run_id: str, strategy: str, prompt: str = "Hello", model_id: str = "tiny-random-llama",
            **fields) -> RunStarted:
    return RunStarted(run_id=run_id, strategy=strategy, config={"temperature": 0.7}, model_id=model_id,
                      weights_hash="seed:0", dtype="float32", device="cpu", seed=3,
                      versions={"python": "3.11.0", "torch": "2.5.0", "bad|name": "x"}, prompt=prompt, chat=False,
                      system_prompt=None, prompt_ids=[5, 6, 7], max_new_tokens=8, stop_strings=[],
                      created_at="2025-01-02T03:04:05+00:00", **fields)


def step(index: int, text: str, origin: str = "plain", **details) -> TokenStep:
    return TokenStep(step=index, position=3 + index, token_id=10 + index, token_text=text, logprob=-0.5, rank=0,
                     entropy=1.25, top_ids=[10 + index, 99], top_logprobs=[-0.5, -1.5], top_texts=[text, "z"],
                     kept_top_ids=[10 + index], kept_top_logprobs=[0.0], kept_count=1, kept_logprob=0.0,
                     details=details, origin=origin)


def finished(text: str, tokens: int, status: str = "ok", error: str | None = None) -> RunFinished:
    return RunFinished(status=status, stop_reason="max_new_tokens", error=error, text=text, new_tokens=tokens,
                       wall_time_s=0.5, prefill_time_s=0.1, target_forward_passes=tokens)


def plain_trace() -> Trace:
    trace = Trace(started("aaaaaaaaaaaa", "greedy", tags={"category": "qa"}))
    for index, text in enumerate("abc"):
        trace.add(step(index, text, mu=1.5, flipped=index == 1))
    trace.add(finished("abc", 3))
    return trace


def speculative_trace() -> Trace:
    trace = Trace(started("bbbbbbbbbbbb", "speculative"))
    trace.add(DraftRound(round=0, position=3, drafter="draft-model", rule="sampling", draft_tokens=[10, 11, 12],
                         draft_texts=["a", "b", "c"], parents=[-1, 0, 1], q=[0.9, 0.8, 0.7], p=[0.95, 0.5, None],
                         u=[0.1, 0.9, None], verdicts=["accepted", "rejected", "unreached"], accepted_count=1,
                         bonus_token=20, bonus_text="x", bonus_kind="correction", draft_time_s=0.01,
                         verify_time_s=0.02, details={"tree": "chain"}))
    trace.add(step(0, "a", origin="draft"))
    trace.add(step(1, "x", origin="bonus"))
    trace.add(finished("ax", 2))
    return trace


def diffusion_trace() -> Trace:
    trace = Trace(started("cccccccccccc", "diffusion"))
    trace.add(UnmaskStep(step=0, block_start=0, block_end=4, masked=[0, 1, 2, 3], predicted_ids=[10, 11, 12, 13],
                         confidences=[0.9, 0.2, 0.8, 0.1], margins=[0.5, 0.1, 0.4, 0.0], entropies=[0.3, 2.0, 0.5, 2.5],
                         committed=[0, 2], committed_ids=[10, 12]))
    trace.add(UnmaskStep(step=1, block_start=0, block_end=4, masked=[1, 3], predicted_ids=[11, 13],
                         confidences=[0.7, 0.6], margins=[0.3, 0.2], entropies=[0.9, 1.0], committed=[1, 3],
                         committed_ids=[11, 13], all_in=True))
    trace.add(finished("abcd", 4))
    return trace


def hostile_trace() -> Trace:
    trace = Trace(started("dddddddddddd", "sample", prompt=HOSTILE_PROMPT))
    trace.add(step(0, "---\n", note="a: [b, c]\n---"))
    trace.add(finished("---\n", 1, status="failed", error='boom: "x"\n---'))
    return trace


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: datasets and huggingface_hub in offline mode (their flags are read at import, so set both)."""
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")


def load(folder, name=None, cache=None):
    return datasets.load_dataset(str(folder), name, split="train", cache_dir=str(cache))


def front_matter(folder) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))


def test_every_table_loads_as_its_own_config_and_round_trips(offline, tmp_path):
    out = tmp_path / "dataset"
    running = Trace(started("ffffffffffff", "greedy", parent_run="aaaaaaaaaaaa", parent_step=1))
    traces = [plain_trace(), speculative_trace(), diffusion_trace(), hostile_trace(), running]
    written = write_dataset(traces, out, command="python -m explorer export --format hf-dataset --out dataset")
    assert written[0].name == "README.md" and {p.name for p in written[1:]} == {f"{t}.parquet" for t in TABLES}

    runs = load(out, cache=tmp_path / "cache")  # the default config
    assert runs.num_rows == 5 and runs["run_id"] == [t.run_id for t in traces]
    hostile = runs[3]
    assert hostile["prompt"] == HOSTILE_PROMPT and hostile["error"] == 'boom: "x"\n---'
    assert hostile["status"] == "failed" and hostile["parent_run"] is None
    assert json.loads(runs[0]["config"]) == {"temperature": 0.7} and json.loads(runs[0]["tags"]) == {"category": "qa"}
    assert runs[4]["status"] == "running" and runs[4]["text"] is None and runs[4]["parent_step"] == 1
    assert json.loads(runs[0]["versions"])["torch"] == "2.5.0" and runs[0]["prompt_ids"] == [5, 6, 7]

    steps = load(out, "steps", tmp_path / "cache")
    assert steps.num_rows == sum(len(t.token_steps) for t in traces)
    first = steps[0]
    assert first["top_ids"] == [10, 99] and first["top_texts"] == ["a", "z"] and first["kept_top_logprobs"] == [0.0]
    assert json.loads(first["details"]) == {"mu": 1.5, "flipped": False}
    assert math.isclose(first["prob"], math.exp(-0.5)) and first["round"] is None
    verified = [row for row in steps if row["run_id"] == "bbbbbbbbbbbb"]
    assert [r["verdict"] for r in verified] == ["accepted", "correction"] and verified[0]["draft_p"] == 0.95
    assert json.loads(steps[-1]["details"]) == {"note": "a: [b, c]\n---"}

    rounds = load(out, "draft_rounds", tmp_path / "cache")
    assert rounds.num_rows == 1
    assert rounds[0]["p"] == [0.95, 0.5, None] and rounds[0]["verdicts"] == ["accepted", "rejected", "unreached"]
    assert rounds[0]["parents"] == [-1, 0, 1] and json.loads(rounds[0]["details"]) == {"tree": "chain"}

    unmask = load(out, "unmask_steps", tmp_path / "cache")
    assert unmask.num_rows == 6 and sum(unmask["committed"]) == 4
    assert unmask[1]["committed"] is False and unmask[1]["committed_id"] is None and unmask[5]["all_in"] is True


def test_empty_tables_keep_their_features(offline, tmp_path):
    """`datasets` cannot load a split without rows: an empty table gets no config, but its file has the columns."""
    import pyarrow.parquet as pq

    full, empty = tmp_path / "full", tmp_path / "empty"
    write_dataset([speculative_trace(), diffusion_trace()], full)
    write_dataset([plain_trace()], empty)
    assert [c["config_name"] for c in front_matter(empty)["configs"]] == ["runs", "steps"]
    assert "no rows in this export" in (empty / "README.md").read_text(encoding="utf-8")
    for name in ("draft_rounds", "unmask_steps"):
        schema = pq.read_schema(empty / "data" / f"{name}.parquet")
        assert pq.read_table(empty / "data" / f"{name}.parquet").num_rows == 0
        assert datasets.Features.from_arrow_schema(schema) == load(full, name, tmp_path / "cache").features
    assert load(empty, "steps", tmp_path / "cache").features == load(full, "steps", tmp_path / "cache").features
    with pytest.raises(ValueError, match="no runs"):
        write_dataset([], tmp_path / "none")


def test_the_card_lists_the_configs_and_keeps_untrusted_text_out(tmp_path):
    out = tmp_path / "dataset"
    odd = Trace(started("eeeeeeeeeeee", "name`with|pipes", model_id="/home/someone/model\n---"))
    odd.add(finished("", 0))
    traces = [plain_trace(), hostile_trace(), odd, speculative_trace(), diffusion_trace()]
    write_dataset(traces, out, command="explorer export --prompt '```\nx'")
    meta = front_matter(out)
    assert [c["config_name"] for c in meta["configs"]] == list(TABLES)
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["runs"]
    assert meta["configs"][1]["data_files"] == [{"split": "train", "path": "data/steps.parquet"}]
    assert meta["license"] == "other"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "<script>" not in card and "someone" not in card and "name`with" not in card and "bad|name" not in card
    assert "`tiny-random-llama` (4)" in card and "`greedy` (1)" in card and "| torch | 2.5.0 |" in card
    assert "````text\nexplorer export --prompt '```\nx'\n````" in card  # a fence the command cannot close
    for table in TABLES:
        assert f"### `{table}`" in card


def test_refuses_a_foreign_folder_and_overwrites_its_own_export(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty") as caught:
        write_dataset([plain_trace()], foreign)
    assert "\n" not in str(caught.value) and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (foreign / "README.md").write_text("---\nconfigs: []\n---\n# someone else's dataset\n")
    with pytest.raises(ValueError, match="not empty"):
        write_dataset([plain_trace()], foreign)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="a link or not a folder"):
        write_dataset([plain_trace()], a_file)

    ours = tmp_path / "ours"
    write_dataset([plain_trace()], ours)
    (ours / "data" / "runs.parquet").unlink()
    target = tmp_path / "elsewhere.parquet"
    target.write_text("keep")
    (ours / "data" / "runs.parquet").symlink_to(target)  # a link is replaced, never written through
    write_dataset([plain_trace(), speculative_trace()], ours)
    assert is_our_export(ours) and target.read_text() == "keep"
    assert not (ours / "data" / "runs.parquet").is_symlink()
    assert not [p for p in (ours / "data").iterdir() if p.name.endswith(".tmp")]


def test_push_to_hub_fails_in_one_line_offline(offline, tmp_path):
    out = tmp_path / "dataset"
    write_dataset([plain_trace()], out)
    with pytest.raises(RuntimeError, match="the Hub cannot be reached") as caught:
        push_to_hub(out, "someone/traces")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(out, "not a repo id")
    with pytest.raises(ValueError, match="no dataset exported"):
        push_to_hub(tmp_path, "someone/traces")
