"""entropy_bound: DiffusionGemma's entropy-bounded block diffusion, run step by step by us, token-identical to the
model's own `generate` (same seed, same settings) on tiny random DiffusionGemma models built in code."""

import json
import os
import subprocess
import sys
from collections import deque

import pytest
import torch

from explorer.events import UnmaskStep
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.entropy_bound import (
    EntropyBoundConfig,
    entropy_bound_accept,
    stable_and_confident,
    step_temperature,
)
from explorer.testing import save_tiny_diffusion_gemma, tiny_diffusion_gemma, tiny_model

PROMPT = "Hello"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run in milliseconds on one thread and far slower when threads contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(lm, prompt_ids, config: EntropyBoundConfig, seed: int, max_new_tokens: int) -> list[int]:
    """transformers' own sampler: `generate` after seeding torch's global generator."""
    from transformers import EntropyBoundSamplerConfig

    torch.manual_seed(seed)
    out = lm.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                            max_denoising_steps=config.max_denoising_steps,
                            sampler_config=EntropyBoundSamplerConfig(entropy_bound=config.entropy_bound),
                            t_min=config.t_min, t_max=config.t_max, stability_threshold=config.stability_threshold,
                            confidence_threshold=config.confidence_threshold)
    return out.sequences[0, len(prompt_ids):].tolist()


def unmask_steps(trace) -> list[UnmaskStep]:
    return [e for e in trace.events if isinstance(e, UnmaskStep)]


def check_identical(lm, trace, params, seed, max_new_tokens):
    """Our tokens are generate's up to where the runner stopped: max_new_tokens inside the last canvas, or an end
    token (generate keeps whole canvases and pads after the end token)."""
    ours = trace.token_ids
    theirs = reference(lm, trace.started.prompt_ids, EntropyBoundConfig(**params), seed, max_new_tokens)
    assert ours == theirs[:len(ours)]
    assert len(ours) == max_new_tokens or ours[-1] in lm.eos_token_ids


CASES = [  # (canvas length, settings): defaults; wide bound and early stops; no stability window, hot to cold
    (8, {"max_denoising_steps": 6}),
    (4, {"max_denoising_steps": 12, "entropy_bound": 3.0, "confidence_threshold": 1.5}),
    (8, {"max_denoising_steps": 10, "entropy_bound": 1.0, "t_min": 0.0, "t_max": 1.5, "stability_threshold": 0,
         "confidence_threshold": 1.0}),
]


@pytest.mark.parametrize("canvas, params", CASES)
def test_entropy_bound_is_token_identical_to_diffusion_gemma_generate(canvas, params):
    lm = tiny_diffusion_gemma(0, canvas_length=canvas)
    accepted, early = 0, 0
    for seed in (0, 1):
        trace = run_to_end(lm, RunRequest.build("entropy_bound", params, PROMPT, max_new_tokens=12, seed=seed,
                                                chat=False))
        check_identical(lm, trace, params, seed, 12)
        steps = unmask_steps(trace)
        assert trace.finished.target_forward_passes == len(steps)  # one decoder pass per denoising step
        accepted = max([accepted] + [len(s.committed) for s in steps if not s.all_in])
        early += sum(1 for s in steps if s.all_in and "stable" in s.rule)
    if params.get("entropy_bound", 0.1) > 1:  # the cases chosen to exercise the bound and the adaptive stop
        assert accepted > 1 and early > 0


def test_unmask_steps_record_acceptance_renoising_and_the_committed_canvas():
    lm = tiny_diffusion_gemma(1, canvas_length=4)
    params = {"max_denoising_steps": 8, "entropy_bound": 2.0}
    trace = run_to_end(lm, RunRequest.build("entropy_bound", params, PROMPT, max_new_tokens=8, seed=5, chat=False))
    check_identical(lm, trace, params, 5, 8)
    steps = unmask_steps(trace)
    finals = [s for s in steps if s.all_in]
    assert [s.block_start for s in finals] == [0, 4][:len(finals)]
    for s in steps:
        assert s.masked == list(range(s.block_start, s.block_end)) and len(s.scores) == len(s.masked)
        if s.all_in:  # the canvas's output: its argmax everywhere
            assert s.committed == s.masked and s.committed_ids == s.predicted_ids and not s.remasked
        else:  # the accepted positions and the renoised ones split the canvas; the lowest entropy is accepted
            assert sorted(s.committed + s.remasked) == s.masked and s.committed
            assert s.masked[s.entropies.index(min(s.entropies))] in s.committed
            assert all(s.scores[s.masked.index(p)] <= 2.0 for p in s.committed)
    committed = [token for s in finals for token in s.committed_ids]
    assert trace.token_ids == committed[:len(trace.token_ids)]
    assert all(step.origin == "denoised" for step in trace.token_steps)
    again = run_to_end(lm, RunRequest.build("entropy_bound", params, PROMPT, max_new_tokens=8, seed=5, chat=False))
    assert again.events[1:-1] == trace.events[1:-1]  # same seed, same trace


def test_an_end_token_stops_the_run_inside_the_canvas_where_generate_pads_after_it():
    lm = tiny_diffusion_gemma(0, canvas_length=4)
    params = {"max_denoising_steps": 4}
    request = RunRequest.build("entropy_bound", params, PROMPT, max_new_tokens=12, seed=0, chat=False)
    free = run_to_end(lm, request).token_ids
    end = free[5]  # a token of the second canvas becomes the end token
    lm.model.generation_config.eos_token_id = end
    trace = run_to_end(lm, request)
    stop = free.index(end)
    assert trace.token_ids == free[:stop + 1] and trace.finished.stop_reason == "eos"
    theirs = reference(lm, trace.started.prompt_ids, EntropyBoundConfig(**params), 0, 12)
    assert theirs[:stop + 1] == trace.token_ids and len(theirs) == 4 * (stop // 4 + 1)  # it ends that canvas
    assert set(theirs[stop + 1:]) <= {lm.model.generation_config.pad_token_id}


def test_the_bound_the_schedule_and_the_stop_rule():
    accepted, load = entropy_bound_accept(torch.tensor([[0.5, 0.01, 0.02, 3.0]]), 0.1)
    assert accepted.tolist() == [[True, True, True, False]]  # sorted loads 0, 0.01, 0.03, 0.53
    assert load[0].tolist() == pytest.approx([0.03, 0.0, 0.01, 0.53])
    first_only, _ = entropy_bound_accept(torch.tensor([[4.0, 5.0]]), 0.1)
    assert first_only.tolist() == [[True, False]]  # the lowest entropy is always accepted
    config = EntropyBoundConfig(max_denoising_steps=48, t_min=0.4, t_max=0.8)
    assert float(step_temperature(config, 48, torch.device("cpu"))) == pytest.approx(0.8)
    assert float(step_temperature(config, 24, torch.device("cpu"))) == pytest.approx(0.6)
    draft, other, sure, unsure = torch.tensor([[1, 2]]), torch.tensor([[1, 3]]), torch.zeros(1, 2), torch.ones(1, 2)
    window: deque = deque(maxlen=1)
    assert not stable_and_confident(window, draft, sure, 0.5)  # nothing to compare with yet
    assert stable_and_confident(window, draft, sure, 0.5)
    assert not stable_and_confident(window, draft, unsure, 0.5)  # stable, not confident
    assert not stable_and_confident(window, other, sure, 0.5)  # confident, not stable
    assert stable_and_confident(deque(maxlen=0), draft, sure, 0.5)  # no window: always stable
    with pytest.raises(ValueError, match="t_max > t_min"):
        EntropyBoundConfig(t_min=0.8, t_max=0.8)
    with pytest.raises(ValueError, match="entropy_bound must be > 0"):
        EntropyBoundConfig(entropy_bound=0.0)


def test_a_diffusion_gemma_model_runs_only_entropy_bound_and_other_models_read_it_as_a_canvas():
    lm = tiny_diffusion_gemma(0)
    assert lm.block_diffusion and lm.diffusion is not None
    with pytest.raises(ValueError, match="use the entropy_bound strategy"):
        run_to_end(lm, RunRequest.build("diffusion", {}, PROMPT, max_new_tokens=4, chat=False))
    with pytest.raises(ValueError, match="masked diffusion LM: choose a diffusion strategy"):
        run_to_end(lm, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=4, chat=False))
    causal = tiny_model(0)
    trace = run_to_end(causal, RunRequest.build("entropy_bound", {"max_denoising_steps": 3, "canvas_length": 4},
                                                PROMPT, max_new_tokens=6, chat=False))
    assert len(trace.token_ids) == 6 and trace.finished.target_forward_passes == len(unmask_steps(trace)) <= 6


def test_entropy_bound_from_the_cli_on_a_saved_tiny_diffusion_gemma(tmp_path):
    from explorer.models import load_model

    path = save_tiny_diffusion_gemma(tmp_path / "dg", seed=2, canvas_length=4)
    env = {**os.environ, "DECODING_EXPLORER_DB": f"sqlite:///{tmp_path / 'cli.sqlite'}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    params = {"max_denoising_steps": 6}
    result = subprocess.run([sys.executable, "-m", "explorer", "run", "--model", str(path), "--strategy",
                             "entropy_bound", "--param", "max_denoising_steps=6", "--prompt", PROMPT, "--no-chat",
                             "--max-new-tokens", "10", "--seed", "3", "--json", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "ok"
    loaded = load_model(str(path), device="cpu")
    assert loaded.block_diffusion and loaded.model.config.canvas_length == 4
    theirs = reference(loaded, loaded.encode_prompt(PROMPT), EntropyBoundConfig(**params), 3, 10)
    assert data["token_ids"] == theirs[:len(data["token_ids"])] and data["token_ids"]
