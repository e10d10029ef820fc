"""Supply chain: the compromised Lightning releases can be neither installed nor resolved, and the installs in the
README and CI take the exact versions of constraints.txt, which covers every dependency pyproject.toml declares.

lightning 2.6.2 and 2.6.3 (GHSA-w37p-236h-pfx3) ran credential-stealing code on import; the same version numbers of
the packages it is built from (pytorch-lightning, lightning-fabric) are refused too.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
COMPROMISED = {dist: ["2.6.2", "2.6.3"] for dist in ("lightning", "pytorch-lightning", "lightning-fabric")}


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def lightning_requirement() -> Requirement:
    (requirement,) = [r for r in pyproject_requirements() if canonicalize_name(r.name) == "lightning"]
    return requirement


def constraint_pins() -> dict[str, Version]:
    """constraints.txt as {canonical name: pinned version}; every line must be an exact `name==version` pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier  # one specifier, and it is ==: a range here would not pin anything
        assert specifier.operator == "==" and "*" not in specifier.version, f"not an exact pin: {line!r}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} pinned twice in constraints.txt"
        pins[name] = Version(specifier.version)
    return pins


@pytest.mark.parametrize("dist", list(COMPROMISED))
def test_installed_lightning_is_not_a_compromised_release(dist):
    try:
        installed = Version(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed")
    assert installed not in {Version(v) for v in COMPROMISED[dist]}, (
        f"{dist} {installed} is a compromised release (GHSA-w37p-236h-pfx3): remove this environment and reinstall "
        "with -c constraints.txt"
    )


def test_pyproject_excludes_the_compromised_lightning_releases():
    specifier = lightning_requirement().specifier
    for bad in COMPROMISED["lightning"]:
        assert not specifier.contains(bad, prereleases=True), f"pyproject.toml's {lightning_requirement()} allows {bad}"
    # Bounded to the minor version tested (polyformer relies on Lightning internals), and that one is allowed.
    assert not specifier.contains("2.7.0", prereleases=True) and not specifier.contains("3.0.0", prereleases=True)
    assert specifier.contains(importlib.metadata.version("lightning"))


def test_constraints_pin_lightning_to_a_safe_accepted_release():
    pins = constraint_pins()
    pinned = pins["lightning"]
    assert lightning_requirement().specifier.contains(pinned), f"constraints.txt pins lightning {pinned}"
    for dist, bad in COMPROMISED.items():
        assert dist not in pins or pins[dist] not in {Version(v) for v in bad}, f"{dist}=={pins[dist]} is compromised"


def test_every_dependency_is_pinned_within_its_range():
    pins = constraint_pins()
    for requirement in pyproject_requirements("dev", "bench"):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} (pyproject.toml) has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, which pyproject.toml's {requirement} does not allow"
        )


def test_readme_and_ci_install_with_the_constraints():
    """The README's two commands install with -c constraints.txt, and CI runs the README's test command as it is."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv \.venv && .*$", readme, flags=re.M)
    assert len(commands) == 2, commands
    for command in commands:
        assert " -c constraints.txt " in command, command
    test_command = next(c for c in commands if c.endswith("&& .venv/bin/pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
