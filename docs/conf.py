"""Sphinx configuration of samx's documentation site.

Build it from the repository root (the `docs` extra installs what it needs):

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks under ../notebooks are rendered from their saved outputs, never
executed: this file copies them into ``docs/notebooks/`` (ignored by git) at
build time, so that they stay in one place in the repository.
"""

import filecmp
import pathlib
import shutil

import samx

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent


def _copy_notebooks() -> None:
    """../notebooks/*.ipynb into docs/notebooks/, only those that changed."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or not filecmp.cmp(source, copy, shallow=False):
            shutil.copyfile(source, copy)


_copy_notebooks()
# The pages autosummary generates, one per public name, made afresh at every
# build: a name taken off an API page loses its page (docs/check_api.py).
shutil.rmtree(DOCS / "api" / "_autosummary", ignore_errors=True)

project = "samx"
author = "The samx developers"
copyright = "the samx developers"
release = samx.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]

# The API pages: one page per public name, generated from the docstrings
# (Google style: Args, Returns, Examples, References).
autosummary_generate = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # the Args, not every field
autodoc_member_order = "bysource"
# Signatures read in one line: the source's defaults (`nnx.Param`, not
# "<class 'flax.nnx.variablelib.Param'>") and optax's alias for a hyperparameter
# that may be a schedule, not its expansion (the modules that use it have
# `from __future__ import annotations`, which this needs).
autodoc_preserve_defaults = True
autodoc_type_aliases = {"optax.ScalarOrSchedule": "optax.ScalarOrSchedule"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A docstring's "Attributes:" as a field list: the properties that ":members:"
# documents (samx.flax.Trainer.state) are then described once.
napoleon_use_ivar = True


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """The fields of a NamedTuple: its docstring's Attributes describe them."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)


# myst-nb: the notebooks keep their saved outputs; nothing is executed.
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"samx {release}"
