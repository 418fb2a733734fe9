"""Packaging: the lowest versions agree everywhere, old Flax fails clearly, LICENSE."""

import importlib
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest

import samx
from samx import _versions

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lowest_pins(file="lowest.txt"):
    """``.ci/lowest.txt`` (or another of CI's constraints files) as {name: version},
    comments dropped."""
    pins = {}
    for line in (ROOT / ".ci" / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def _lower_bounds(requirements):
    """{name: version} of the ``name>=version`` requirements."""
    bounds = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", req.strip())
        if match:
            bounds[match[1]] = match[2]
    return bounds


def _declared_bounds():
    project = PYPROJECT["project"]
    bounds = _lower_bounds(project["dependencies"])
    for extra in ("flax", "test"):
        bounds.update(_lower_bounds(project["optional-dependencies"][extra]))
    return bounds


@pytest.mark.parametrize(
    "file, name",
    [
        ("lowest.txt", "jax"),
        ("lowest.txt", "optax"),
        ("lowest-flax.txt", "flax"),
        ("lowest-flax.txt", "optax"),
        ("lowest-flax.txt", "orbax-checkpoint"),
    ],
)
def test_lowest_pins_are_the_declared_lower_bounds(file, name):
    assert _lowest_pins(file)[name] == _declared_bounds()[name]


def test_the_flax_pins_name_a_jax_no_older_than_samxs():
    # Flax's lowest needs a newer jax than samx's lowest; never an older one.
    core, flax = _lowest_pins(), _lowest_pins("lowest-flax.txt")
    assert _versions._release(flax["jax"]) >= _versions._release(core["jax"])
    assert set(core) <= set(flax)  # every core dependency pinned in both


@pytest.mark.parametrize("file", ["lowest.txt", "lowest-flax.txt"])
def test_jaxlib_is_pinned_with_jax(file):
    pins = _lowest_pins(file)
    assert pins["jaxlib"] == pins["jax"]


def test_the_lowest_flax_leg_runs_at_its_pins_with_the_lowest_jax_flax_allows():
    # Only where Flax is installed at its pinned lowest version (CI's
    # lowest-version leg, .ci/lowest-and-wheel): everything else is at its pin
    # too, and the pinned jax is the lowest that this Flax declares it needs.
    pins = _lowest_pins("lowest-flax.txt")
    try:
        installed = importlib.metadata.version("flax")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != pins["flax"]:
        pytest.skip(f"flax {installed} is installed, not the pinned {pins['flax']}")
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, name
    needs = _lower_bounds(
        req.split(";")[0].replace(" ", "")
        for req in importlib.metadata.requires("flax")
        if ";" not in req or "extra" not in req
    )
    assert needs["jax"] == pins["jax"]


def test_every_extra_asks_for_the_same_flax():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert _lower_bounds(extras["flax"])["flax"] == _versions.FLAX
    assert _lower_bounds(extras["examples"])["flax"] == _versions.FLAX


def test_the_import_check_asks_for_the_pinned_flax():
    assert _versions.FLAX == _lowest_pins("lowest-flax.txt")["flax"]


@pytest.mark.parametrize(
    "version, release",
    [("0.12.7", (0, 12, 7)), ("0.12.10", (0, 12, 10)), ("1.0rc1", (1, 0))],
)
def test_release_numbers(version, release):
    assert _versions._release(version) == release


def _installed(flax_version):
    """``importlib.metadata.version`` with Flax at ``flax_version`` (None: absent)."""
    real = importlib.metadata.version

    def version(dist):
        if dist != "flax":
            return real(dist)
        if flax_version is None:
            raise importlib.metadata.PackageNotFoundError(dist)
        return flax_version

    return version


@pytest.mark.parametrize(
    "flax_version, message",
    [
        ("0.12.6", "needs flax>=0.12.7, but flax 0.12.6 is installed"),
        ("0.11.0", "needs flax>=0.12.7, but flax 0.11.0 is installed"),
        (None, "needs flax>=0.12.7, which is not installed"),
    ],
)
def test_samx_flax_with_an_old_flax_raises_an_import_error_naming_the_version(
    monkeypatch, flax_version, message
):
    monkeypatch.setattr(importlib.metadata, "version", _installed(flax_version))
    monkeypatch.delitem(sys.modules, "samx.flax", raising=False)
    monkeypatch.delattr(samx, "flax", raising=False)
    with pytest.raises(ImportError, match=re.escape(message)) as info:
        importlib.import_module("samx.flax")
    assert "pip install -U 'samx[flax]'" in str(info.value)


@pytest.mark.parametrize("flax_version", [_versions.FLAX, "0.12.10", "1.0.0"])
def test_samx_flax_imports_with_a_new_enough_flax(monkeypatch, flax_version):
    monkeypatch.setattr(importlib.metadata, "version", _installed(flax_version))
    monkeypatch.delitem(sys.modules, "samx.flax", raising=False)
    monkeypatch.delattr(samx, "flax", raising=False)
    assert importlib.import_module("samx.flax").nnx_grads


def test_license_file_is_the_declared_apache_2():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_an_unreleased_section():
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_readme_first_example_needs_only_jax_optax_and_samx():
    # The wheel check in CI runs it in a venv with only samx's dependencies.
    first = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    imports = re.findall(r"^(?:import|from) (\w+)", first[0], flags=re.M)
    assert set(imports) <= {"jax", "optax", "samx"}, imports
