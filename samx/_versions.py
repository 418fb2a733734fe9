"""The lowest versions of the optional dependencies, checked where samx imports them.

pip enforces ``pyproject.toml``'s bounds on jax and optax. An optional
dependency installed on its own, such as a Flax older than the ``samx[flax]``
extra asks for, is not checked by pip: the modules that import it call
:func:`require` first, so that an old version fails at import with a message
naming the version it needs instead of an ``AttributeError`` from inside Flax
later. ``.ci/lowest-flax.txt`` pins these same versions, with the lowest jax
that they allow, for the Flax step of CI's lowest-version leg;
``tests/test_packaging.py`` checks that the three places agree.
"""

import importlib.metadata
import re

# ``flax.nnx.as_pure`` (used by samx.flax) first appeared in Flax 0.12.7.
FLAX = "0.12.7"


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version: ``"0.12.7rc1"`` gives ``(0, 12, 7)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def require(dist: str, minimum: str, module: str, extra: str) -> None:
    """Raises an ``ImportError`` unless ``dist`` is installed at ``minimum`` or newer.

    Args:
      dist: the distribution's name on PyPI, e.g. ``"flax"``.
      minimum: the lowest version ``module`` supports, e.g. ``"0.12.7"``.
      module: the samx module that needs it, named in the message.
      extra: samx's extra that installs it, named in the message.

    Examples:
      >>> require("jax", "0.1", "samx", "")
      >>> require("jax", "999.0", "samx.example", "example")
      Traceback (most recent call last):
      ...
      ImportError: `samx.example` needs jax>=999.0, but jax ... is installed...
    """
    hint = f"pip install -U 'samx[{extra}]'" if extra else f"pip install -U '{dist}'"
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"`{module}` needs {dist}>={minimum}, which is not installed: {hint}."
        ) from None
    if _release(installed) < _release(minimum):
        raise ImportError(
            f"`{module}` needs {dist}>={minimum}, but {dist} {installed} is"
            f" installed: {hint}."
        )
