"""Sweeps on Ray: the prompt x strategy x seed matrix on actors that each hold one loaded model.

`python -m explorer sweep ... --ray [ADDRESS]`. The driver (this process) plans the matrix, skips the cells
already stored ok (the same sweep keys as a local sweep: a sweep started again resumes), and hands each cell to
an `ActorPool` of `SweepWorker` actors (one per GPU, or per CPU slot: `--workers`), collecting results with
`map_unordered`. A worker decodes with no database: it returns the cell's finished runs (traces: plain
dataclasses), and the driver writes them into the one database (`--db`, e.g. a lab's PostgreSQL). A run that
fails comes back stored as failed; a worker that dies is reported with its cell; Ctrl-C stops dispatching and
leaves every run that came back stored.

Ray is an optional extra: `pip install "decoding-explorer[ray]"`. Without an address a local Ray starts with
`num_cpus = workers` (`ray.init(num_cpus=...)`); with one (`ray start --head` on the head node, then
`--ray HOST:6379` or `--ray auto`), the cluster's nodes need this package and the model (a Hub id in their cache
or a path they can read), and the plugins the driver loaded (each worker loads the same files or modules, and
finds its own entry points): a plugin file by the same absolute path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from explorer.plugins import sources as plugin_sources
from explorer.recorder import Recorder
from explorer.sweep import Cell, SweepReport, run_cell, stored_answers


@dataclass
class CellResult:
    """What a worker sends back for one cell: its new runs (finished, ok or failed) and the error that ended it."""

    cell: Cell
    traces: list[Any] = field(default_factory=list)
    error: str | None = None


class SweepWorker:
    """One loaded model; runs cells. (Made a Ray actor by `ray.remote` in `run_sweep_on_ray`.)"""

    def __init__(self, model_id: str | None, dtype: str, device: str, plugins: Sequence[str] = ()):
        from explorer.models import load_model
        from explorer.plugins import load_plugins

        # The driver's plugins, loaded before any cell arrives: a cell's config unpickles from its plugin module.
        failures = load_plugins(plugins)
        if failures:
            raise ValueError("; ".join(failures))
        self.model = load_model(model_id, dtype=dtype, device=device)

    def model_id(self) -> str:
        return self.model.info.model_id

    def run(self, cell: Cell, known: dict[str, str], max_new_tokens: int, chat: bool | None) -> CellResult:
        result = CellResult(cell)

        def recorder() -> Recorder:  # in memory only: the driver writes the database
            recorder = Recorder()
            recorders.append(recorder)
            return recorder

        recorders: list[Recorder] = []
        try:
            run_cell(self.model, cell, max_new_tokens, chat, known.get, recorder)
        except Exception as error:  # the failed run's trace (stored as failed by the runner) comes back too
            result.error = f"{type(error).__name__}: {error}"
        result.traces = [r.trace for r in recorders if r.trace is not None and r.trace.finished is not None]
        return result


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray: pip install "decoding-explorer[ray]"') from None
    return ray


def run_sweep_on_ray(model_id: str | None, cells: Sequence[Cell], store: Any, *, address: str | None = None,
                     workers: int = 2, gpus_per_worker: float = 0.0, dtype: str = "auto", device: str = "cpu",
                     max_new_tokens: int = 64, chat: bool | None = None,
                     progress: Callable[[str], None] | None = None) -> SweepReport:
    """Run `cells` on `workers` Ray actors and write their runs into `store`; see the module's docstring."""
    ray = ray_module()
    from ray.util import ActorPool

    if workers < 1:
        raise ValueError("--workers must be >= 1")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, num_gpus=0 if gpus_per_worker == 0 else None, include_dashboard=False,
                     log_to_driver=False)
    report = SweepReport()
    try:
        # A worker that dies comes back (its model loaded again) for the next cells; the cell it was on is not
        # retried: it is reported as failed.
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=2, max_task_retries=0)(SweepWorker)
        pool_actors = [actor.remote(model_id, dtype, device, plugin_sources()) for _ in range(workers)]
        keys_model = ray.get(pool_actors[0].model_id.remote())  # the id the sweep keys use (as a local sweep's)
        todo = []
        for cell in cells:
            known = stored_answers(keys_model, cell, store, max_new_tokens, chat)
            if len(known) == len(cell.item.turns):
                report.skipped += len(known)
                if progress is not None:
                    progress(cell.what)
            else:
                report.skipped += len(known)
                todo.append((cell, known))
        pool = ActorPool(pool_actors)
        results = pool.map_unordered(
            lambda worker, job: worker.run.remote(job[0], job[1], max_new_tokens, chat), todo)
        returned: set[str] = set()
        lost: list[str] = []
        for _ in range(len(todo)):
            try:
                result = next(results)
            except StopIteration:
                break
            except ray.exceptions.RayError as error:  # a worker died: reported with its cell below
                lost.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}")
                continue
            returned.add(result.cell.what)
            for trace in result.traces:
                store.save_trace(trace)
            report.done += sum(1 for t in result.traces if t.finished.status == "ok")
            if result.error:
                report.failed.append((result.cell.what, result.error))
            if progress is not None:
                progress(result.cell.what)
        missing = [cell.what for cell, _ in todo if cell.what not in returned]
        for index, what in enumerate(missing):  # the cells whose worker died on them
            report.failed.append((what, lost[index] if index < len(lost) else "its worker was lost"))
    finally:
        if started_here:
            ray.shutdown()
    return report
