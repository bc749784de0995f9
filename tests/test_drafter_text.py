"""drafter-data --text: teacher-forced chunks of local text with the target's features, for soft-label training."""

import pytest
import torch

from explorer.drafter_data import load_sequences, text_data, text_files
from explorer.testing import tiny_model
from explorer.train_drafter import teacher_forced


def test_text_chunks_carry_the_teacher_forced_features_and_skip_the_benchmark(tmp_path):
    from explorer.drafter_data import benchmark_prompts

    lm = tiny_model(0, scale=8.0)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (folder / "b.md").write_text("# Notes\n\nPython lists grow by over-allocation when appended to. " * 40)
    (folder / "held.rst").write_text("Intro. " * 40 + next(iter(benchmark_prompts())) + " Outro. " * 40)
    (folder / "skip.bin").write_bytes(b"\x00" * 500)
    assert [p.name for p in text_files([folder])] == ["a.txt", "b.md", "held.rst"]
    out = tmp_path / "text.npz"
    record = text_data(lm, out, [folder], tokens=100_000, licence="CC0 (written by the test)", chunk=64, batch=3,
                       progress=False)
    rows, first, stored = load_sequences(out)
    assert stored == record and record["licence"].startswith("CC0") and record["text_files"] == 2
    stream = sum(len(lm.tokenizer((folder / n).read_text(), add_special_tokens=False)["input_ids"])
                 for n in ("a.txt", "b.md"))
    assert len(rows) == record["sequences"] == stream // 64 and set(first) == {0}
    for ids, features, argmax in rows[:3]:
        assert len(ids) == 64 and features.shape == (64, lm.model.config.hidden_size)
        reference = teacher_forced(lm, ids.tolist())
        assert torch.allclose(features.float(), reference.features, atol=2e-2)
        assert (argmax == reference.argmax).float().mean() > 0.95


def test_text_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        text_files([tmp_path / "missing"])
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ValueError, match="no .txt, .md or .rst"):
        text_files([tmp_path])
