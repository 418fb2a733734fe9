"""Transforms placed before a samx transform in an ``optax.chain``.

A transform chained *before* ``samx.sam`` or ``samx.async_sam`` changes only
the ascent gradient, whose normalisation then undoes any rescaling; one before
``samx.sampa`` has no effect at all (it does not read its input). Weight decay
or gradient clipping placed there never reaches the descent step: they belong
inside ``base``. The transforms cannot see the chain they sit in; whoever holds
the whole optimizer state (the Trainer, the Flax helpers) can, through
:func:`transforms_before`, and warn with :func:`warn_transforms_before`.

The state is all there is to look at: ``optax.chain``'s state is a plain tuple
of its members' states, in order, and a samx transform's state is a
``SAMState``, ``AsyncSAMState`` or ``SAMPaState``. Which transform precedes it
cannot be told in general (``optax.add_decayed_weights``,
``optax.clip_by_global_norm`` and ``optax.scale`` all have an ``EmptyState``),
so every one is reported.
"""

import warnings
from typing import Any

import jax

from samx._async_sam import AsyncSAMState
from samx._sam import SAMState
from samx._sampa import SAMPaState

_SAMX_STATES = (SAMState, AsyncSAMState, SAMPaState)


def _children(node: Any) -> list:
    """The immediate subtrees of a pytree node (none for a leaf)."""
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    return [] if jax.tree_util.treedef_is_leaf(treedef) else children


def _holds_samx(node: Any) -> bool:
    """Whether ``node`` is, or contains, the state of a samx transform."""
    return any(
        isinstance(x, _SAMX_STATES)
        for x in jax.tree.leaves(node, is_leaf=lambda x: isinstance(x, _SAMX_STATES))
    )


def transforms_before(opt_state: Any) -> list[str]:
    """The states of the transforms chained before a samx transform.

    Args:
      opt_state: an optimizer state, e.g. ``tx.init(params)`` or
        ``jax.eval_shape(tx.init, params)`` (only its structure is read).

    Returns:
      The type names of the states of the members of an ``optax.chain`` that
      come before a member holding a samx state, in order; empty when there
      are none.
    """
    found: list[str] = []

    def visit(node: Any) -> None:
        if type(node) is tuple:  # optax.chain's state; NamedTuples are not
            first = next((k for k, x in enumerate(node) if _holds_samx(x)), 0)
            found.extend(type(x).__name__ for x in node[:first])
        for child in _children(node):
            visit(child)

    visit(opt_state)
    return found


def warn_transforms_before(where: str, opt_state: Any) -> None:
    """Warns when ``opt_state`` shows transforms chained before a samx one.

    Args:
      where: the caller, named in the message, e.g. ``"samx.runtime.Trainer"``.
      opt_state: the optimizer state, as for :func:`transforms_before`.
    """
    before = transforms_before(opt_state)
    if before:
        warnings.warn(
            f"{where}: the optimizer chains {len(before)} transform(s) (states:"
            f" {', '.join(before)}) before a samx transform. There they change"
            " only the ascent gradient, whose normalisation undoes any"
            " rescaling, or nothing at all (samx.sampa does not read its"
            " input): weight decay or clipping placed there never reaches the"
            " descent step. Put them inside `base`, e.g. `samx.sam(optax.chain("
            "optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)))`.",
            UserWarning,
            stacklevel=3,
        )
