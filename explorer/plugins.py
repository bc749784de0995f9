"""Plugins: your own strategies, drafters, diffusion schedules and views, loaded from outside the project.

A plugin is a Python file (`path/to/mine.py`) or an importable module (`pkg.mod`) that registers what it adds
when it is imported, through `explorer.api` (README, "Your own method"). They load, in this order:
1. the environment variable DECODING_EXPLORER_PLUGINS (comma-separated),
2. the CLI's global `--plugin PATH_OR_MODULE` (repeatable, before the subcommand),
3. installed packages' entry points in the group `decoding_explorer.plugins` (`mine = "pkg.mod"`; an entry point
   naming a function, `"pkg.mod:setup"`, has that function called with no arguments after the import).
The CLI loads them in `main`, the app when it builds its page (app.py), a Ray sweep worker in its constructor
(with the driver's list). Nothing loads a plugin a request names: a Space runs a plugin only when its owner sets
the variable or installs the package, since loading one runs its code.

Whatever a plugin registers is listed under "plugins" (`StrategySpec.plugin` names it) and stays out of the
fidelity ledger. A plugin that fails to import, or registers a name that is taken, is undone (what it registered
before failing is removed) and reported as one line naming it and the cause; the others load and the app starts.
Loading the same plugin twice does nothing the second time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from explorer.params import one_line

ENV = "DECODING_EXPLORER_PLUGINS"
ENTRY_POINT_GROUP = "decoding_explorer.plugins"


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: `spec` as given (a path, a module, or "entry point NAME"), what another process passes to
    load it again (`source`: the absolute path or the module; "" for an entry point, which each process finds
    itself), and the names it registered."""

    spec: str
    source: str
    strategies: tuple[str, ...]
    views: tuple[str, ...]


_LOADED: dict[str, Plugin] = {}  # by key: the resolved path, the module name, or "entry point NAME"


def specs_from_env(env: Mapping[str, str] = os.environ) -> list[str]:
    """The plugins DECODING_EXPLORER_PLUGINS names (comma-separated paths or modules)."""
    return [spec.strip() for spec in env.get(ENV, "").split(",") if spec.strip()]


def loaded() -> list[Plugin]:
    """The plugins loaded in this process, in load order."""
    return list(_LOADED.values())


def sources() -> list[str]:
    """What a worker process passes to `load_plugins` to load the same plugins (entry points it finds itself)."""
    return [plugin.source for plugin in _LOADED.values() if plugin.source]


def load_plugins(specs: Sequence[str], *, entry_points: bool = True) -> list[str]:
    """Load each plugin of `specs` (a .py path or an importable module), in order, then (with `entry_points`) the
    installed packages' plugins; return one line per plugin that failed, naming it and the cause."""
    found = _entry_points() if entry_points else []
    if not specs and not found:
        return []  # nothing to load: no torch, no plotly imported
    import explorer.strategies  # noqa: F401  (the built-ins register first: a plugin's clash is the plugin's)
    import viz.catalog  # noqa: F401  (the built-in views, likewise)

    errors = []
    for spec in specs:
        error = _load(spec, *_locate(spec))
        if error:
            errors.append(error)
    for entry in found:
        error = _load(f"entry point {entry.name}", f"entry point {entry.name}", "", entry)
        if error:
            errors.append(error)
    return errors


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda entry: entry.name)


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _locate(spec: str) -> tuple[str, str]:
    """(key, source) of a spec: a file by its resolved path, a module by its name."""
    if _is_path(spec):
        path = str(Path(spec).expanduser().resolve())
        return path, path
    return spec, spec


def _load(spec: str, key: str, source: str, entry: importlib.metadata.EntryPoint | None = None) -> str:
    """Import one plugin and record what it registered; undo it and return the error line if it fails."""
    if key in _LOADED:
        return ""
    from explorer.strategies.base import REGISTRY
    from explorer.strategies.logits_processor import PLUGIN_PROCESSORS
    from viz.catalog import VIEW_NAMES, unregister_view

    strategies_before, views_before, processors_before = set(REGISTRY), set(VIEW_NAMES), set(PLUGIN_PROCESSORS)
    module = entry.module if entry is not None else _file_module(Path(source)) if _is_path(spec) else spec
    try:
        if entry is not None:
            loaded_object = entry.load()
            if callable(loaded_object) and not isinstance(loaded_object, ModuleType):
                loaded_object()
        elif _is_path(spec):
            _import_file(Path(source))
        else:
            importlib.import_module(spec)
    except Exception as error:  # a plugin's own code: any error is its, reported in one line
        for name in set(REGISTRY) - strategies_before:
            del REGISTRY[name]
        for name in [v for v in VIEW_NAMES if v not in views_before]:
            unregister_view(name)
        for name in set(PLUGIN_PROCESSORS) - processors_before:
            del PLUGIN_PROCESSORS[name]
        for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
            del sys.modules[name]  # so that the plugin, fixed, can be loaded again
        return f"plugin {spec}: {one_line(error)}"
    added = tuple(name for name in REGISTRY if name not in strategies_before)
    for name in added:
        REGISTRY[name] = dataclasses.replace(REGISTRY[name], plugin=spec)
    _LOADED[key] = Plugin(spec, source, added, tuple(v for v in VIEW_NAMES if v not in views_before))
    return ""


def _import_file(path: Path) -> ModuleType:
    """Import a .py file as a module whose name is the same in every process (a Ray worker unpickles its configs
    by that name)."""
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    name = _file_module(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before it runs: dataclasses and type hints look their module up there
    module_spec.loader.exec_module(module)
    return module


def _file_module(path: Path) -> str:
    """The module name of a plugin file: its stem and a hash of its path (two mine.py in two folders differ)."""
    stem, digest = re.sub(r"\W", "_", path.stem), hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"decoding_explorer_plugin_{stem}_{digest}"

