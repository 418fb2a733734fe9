"""The public surface: __all__, re-exports, version, and what `import samx` loads."""

import importlib
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

import samx


def test_all_is_sorted_and_importable():
    assert list(samx.__all__) == sorted(samx.__all__)
    for name in samx.__all__:
        assert getattr(samx, name) is not None, name
        assert not name.startswith("_")


@pytest.mark.parametrize(
    "module",
    ["samx", "samx.diagnostics", "samx.runtime", "samx.flax", "samx.runtime.launch"],
)
def test_public_callables_have_documented_examples(module):
    mod = importlib.import_module(module)
    for name in mod.__all__:
        obj = getattr(mod, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{module}.{name} has no docstring"
        if callable(obj) and not isinstance(obj, type):
            for section in ("Args:", "Returns:", "Examples:", "References:"):
                assert section in doc, f"{module}.{name} docstring lacks {section}"


def test_version_comes_from_metadata():
    assert samx.__version__ == importlib.metadata.version("samx")


def test_ships_py_typed():
    assert (pathlib.Path(samx.__file__).parent / "py.typed").is_file()


def test_import_samx_loads_neither_runtime_nor_flax_nor_examples():
    code = (
        "import sys, samx; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flax', 'sklearn',"
        " 'matplotlib') or m.startswith(('samx.runtime', 'samx.examples'))]; "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_import_samx_does_no_jax_work():
    # No backend initialisation, hence no computation, at import time.
    code = (
        "import jax._src.xla_bridge as xb, samx; "
        "print(bool(getattr(xb, '_backends', {})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stdout
