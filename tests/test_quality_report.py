"""The report's quality half: per method mean ± interval of the quality metrics and speed, quality vs speed with
the Pareto front, and the samplers' diversity vs quality across temperatures (hand-built runs)."""

from __future__ import annotations

import pytest

from explorer.events import QualityProbe, RunFinished
from explorer.export import quality_markdown
from explorer.metrics import quality_table
from explorer.sweep import write_report
from explorer.trace import Trace
from tests.test_engines import started, token
from viz.report import diversity_quality_figure, pareto_front, quality_speed_figure


def sampled(run_id: str, strategy: str, temperature: float | None, ids: list[int], coherence: float,
            wall: float, method: str) -> Trace:
    start = started(run_id, strategy)
    start.config.update({} if temperature is None else {"temperature": temperature})
    start.tags["method"] = method
    trace = Trace(start)
    for step, token_id in enumerate(ids):
        trace.add(token(step, "plain").__class__(**{**token(step, "plain").__dict__, "token_id": token_id}))
    trace.add(QualityProbe(coherence=coherence, layer=-1))
    trace.add(RunFinished(status="ok", stop_reason="length", error=None, text="x", new_tokens=len(ids),
                          wall_time_s=wall, prefill_time_s=0.0, target_forward_passes=len(ids)))
    return trace


def runs() -> list[Trace]:
    out = []
    for seed, ids in enumerate(([1, 2, 3, 4, 5, 6], [1, 2, 1, 2, 1, 2])):
        out.append(sampled(f"a{seed:011d}", "sample", 0.7, ids, 0.5 + 0.1 * seed, 1.0, "sample(temperature=0.7)"))
        out.append(sampled(f"b{seed:011d}", "sample", 1.2, [7, 8, 9, 10, 11, 12], 0.3, 1.0, "sample(temperature=1.2)"))
        out.append(sampled(f"c{seed:011d}", "greedy", None, [1, 1, 1, 1, 1, 1], 0.4, 0.5, "greedy"))
    return out


def test_the_quality_table_gives_means_and_intervals_over_runs():
    table = quality_table(runs())
    low_t = table["sample(temperature=0.7)"]
    assert low_t["runs"] == 2 and low_t["temperature"] == 0.7 and low_t["strategy"] == "sample"
    mean, low, high = low_t["coherence"]
    assert mean == pytest.approx(0.55) and high - mean == pytest.approx(12.7062 * 0.05, rel=1e-4)
    assert low_t["distinct_2"][0] == pytest.approx((1.0 + 2 / 5) / 2)  # 5 of 5, then {12, 21} of 5
    assert table["greedy"]["tokens_per_s"][0] == pytest.approx(12.0)
    assert "| sample(temperature=0.7) | 2 |" in quality_markdown(table)


def test_the_pareto_front_keeps_what_nothing_beats():
    points = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (0.8, 0.8)]
    assert pareto_front(points) == [0, 1, 2]
    assert pareto_front(points, maximize_x=False) == [2]  # fewer passes and better: (0.5, 2) beats the rest
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # ties dominate nothing


def test_the_figures_mark_the_front_and_join_temperatures(tmp_path):
    table = quality_table(runs())
    speed = quality_speed_figure(table)
    front = next(t for t in speed.data if t.name == "Pareto front")
    assert list(front.x) == pytest.approx([6.0, 12.0])  # sample(T=0.7) (the better coherence) and greedy
    diversity = diversity_quality_figure(table)
    assert [t.name for t in diversity.data] == ["sample"] and list(diversity.data[0].text) == ["T=0.7", "T=1.2"]
    from viz.report import _without_temperature

    assert _without_temperature("sample(temperature=0.7,top_p=0.9)") == "sample(top_p=0.9)"
    assert _without_temperature("mbr(samples=8,temperature=1.0)") == "mbr(samples=8)"
    assert _without_temperature("top_h(temperature=1.0)") == "top_h"
    written = write_report(runs(), tmp_path / "report", formats=("svg",))
    names = {p.name for p in written}
    assert {"quality_metrics.md", "quality_metrics.tex", "quality_speed.svg", "diversity_quality.svg",
            "quality_compute.svg"} <= names


def test_mauve_joins_the_table_with_references_and_a_model(tmp_path, tiny):
    from explorer.quality import load_reference_texts

    refs = tmp_path / "refs.jsonl"
    refs.write_text('"the sea is wide"\n{"text": "a dragon in the dark"}\nplain line of text\n')
    assert load_reference_texts(refs) == ["the sea is wide", "a dragon in the dark", "plain line of text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n"x"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_reference_texts(bad)
    traces = runs()
    for trace in traces:
        trace.started.prompt_ids[:] = [3, 4]
    table = quality_table(traces, load_reference_texts(refs), tiny)
    assert all(0.0 <= row["mauve"] <= 1.0 for row in table.values())
    assert "MAUVE" in quality_markdown(table)
