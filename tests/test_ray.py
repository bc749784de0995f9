"""Sweeps on Ray: a local Ray with 2 workers on a tiny model writes exactly the matrix, once, into the database;
the same sweep keys as a local sweep (so either resumes the other); failures are reported, not lost."""

import json

import pytest

from explorer.cli import main
from store import Store

pytest.importorskip("ray", reason='Ray is an optional extra: pip install "decoding-explorer[ray]"')

PROMPTS = [
    {"category": "copy", "name": "c1", "prompt": "the cat sat on the mat. the cat sat on the"},
    {"question_id": 7, "category": "chat", "turns": ["Say hello.", "Now say it again."]},
]


def test_a_sweep_on_local_ray_writes_the_matrix_once(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    url = f"sqlite:///{tmp_path / 'ray.sqlite'}"
    common = ["sweep", "--prompts", str(prompts), "--strategies", "greedy; sample:top_p=0.9; self_speculative:skip=5",
              "--seeds", "2", "--model", str(tiny_dir), "--max-new-tokens", "8", "--device", "cpu", "--quiet"]
    assert main([*common, "--db", url, "--ray", "--workers", "2"]) == 1  # self_speculative:skip=5 fails
    out = capsys.readouterr()
    assert "sweep: 12 runs done, 0 already done (skipped), 4 failed" in out.out  # 2 methods x 2 seeds x 3 turns
    assert out.err.count("cannot skip layers") == 4
    store = Store(url)
    traces = store.load_traces(store.run_ids(sweep_only=True))
    keys = [t.started.tags["sweep_key"] for t in traces]
    assert len(traces) == 12 and len(set(keys)) == 12 and all(t.status == "ok" for t in traces)
    turns = sorted(t.started.tags.get("turn", "-") for t in traces if t.started.tags["prompt_name"] == "q7")
    assert turns == ["0", "0", "0", "0", "1", "1", "1", "1"]

    # A local sweep over the same matrix finds every cell done (the same keys), and decodes the same tokens.
    assert main([*common, "--db", url]) == 1
    assert "sweep: 0 runs done, 12 already done (skipped), 4 failed" in capsys.readouterr().out
    local = f"sqlite:///{tmp_path / 'local.sqlite'}"
    main([*common, "--db", local])
    here = Store(local)
    by_key = {t.started.tags["sweep_key"]: t.token_ids for t in here.load_traces(here.run_ids(sweep_only=True))}
    assert by_key == {t.started.tags["sweep_key"]: t.token_ids for t in traces}


def test_ray_sweep_refuses_bad_settings_in_one_line(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert main(["sweep", "--prompts", str(prompts), "--strategies", "greedy", "--ray", "--workers", "0",
                 "--db", f"sqlite:///{tmp_path / 'x.sqlite'}", "--model", str(tiny_dir), "--quiet"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
