"""The Trainer's jitted pieces: the fused step, SAMPa's vmapped step, and the
two-device step's ascent, descent and apply pieces.

A mixin of :class:`samx.runtime.Trainer`, kept apart from its placement and
checks. Each piece calls the pure transform (``tx.update``) with a
``grad_fn`` that evaluates the loss where the evaluation plan says, or hands
back gradients computed on the other device. It reads the Trainer's
attributes: ``tx``, ``_plan``, ``_value_and_grad``, ``ascent_batch_size``,
``mesh``, ``donate``, ``_compiled``, ``_state_place``, ``_batch_place`` and
``_multiprocess``, and its ``_put``.
"""

from functools import partial

import jax
import optax

from samx import _plan
from samx._perturb import f32_global_norm
from samx.runtime import _processes


class Pieces:
    """The jitted pieces of :class:`samx.runtime.Trainer`'s step."""

    def _one_jit(self, name, fn, on_descent=True, update_args=None, donate=False):
        """``jax.jit(fn)``, once; on a mesh, the descent side's outputs replicated.

        ``donate``: the pieces that take the state and return the next one
        donate it (its first argument), with ``Trainer(donate=True)``.
        With ``update_args`` (a dict, for the pieces that call ``tx.update``),
        ``fn(update_args, *args)``, jitted once per value: a piece whose inputs
        do not show the batch size (``_apply``) would not retrace for a new
        ``b'/b``.
        """
        key = name
        if update_args is not None:
            key = (name, tuple(sorted(update_args.items())))
            fn = partial(fn, update_args)
        if key not in self._compiled:
            kwargs = {"donate_argnums": 0} if donate and self.donate else {}
            if self.mesh is not None and on_descent:
                kwargs["out_shardings"] = self._state_place
            self._compiled[key] = jax.jit(fn, **kwargs)
        return self._compiled[key]

    def _batches(self, prev, batch):
        return _plan.select_batches(
            self._plan, batch, prev, ascent_batch_size=self.ascent_batch_size
        )

    def _finish(self, state, updates, opt_state, outputs, ascent_norms=True):
        """The new state and the metrics, from each evaluation's outputs."""
        loss, model_state, grads = outputs[self._plan.descent.index]
        state = state._replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state=model_state,
        )
        metrics = {"loss": loss, "grad_norm": f32_global_norm(grads)}
        for e in self._plan.on(_plan.ASCENT_DEVICE) if ascent_norms else ():
            metrics["ascent_grad_norm"] = f32_global_norm(outputs[e.index][2])
        return state, metrics

    def _fused(self, update_args, state, prev, batch):
        """The pure step in one jit: every evaluation on the descent device."""
        batches = self._batches(prev, batch)
        outputs = {}

        def gradient(e, point):
            outputs[e.index] = self._value_and_grad(
                point, state.model_state, batches[e.index]
            )
            return outputs[e.index][2]

        updates, opt_state = _plan.plan_update(
            self._plan,
            self.tx,
            state.params,
            state.opt_state,
            gradient,
            **update_args,
        )
        return self._finish(state, updates, opt_state, outputs)

    def _update_from(self, update_args, state, outputs):
        """The transform's update, fed the gradients ``outputs`` computed."""
        return _plan.plan_update(
            self._plan,
            self.tx,
            state.params,
            state.opt_state,
            lambda e, p: outputs[e.index][2],
            **update_args,
        )

    def _vmapped(self, update_args, state, prev, batch):
        """A parallel plan on one device: its gradients in one ``vmap``-ed call."""
        points = _plan.evaluation_points(
            self._plan, self.tx, state.params, state.opt_state
        )
        outputs = _plan.stacked_call(
            self._value_and_grad, points, self._batches(prev, batch), state.model_state
        )
        updates, opt_state = self._update_from(update_args, state, outputs)
        return self._finish(state, updates, opt_state, outputs)

    def _step_two_devices(
        self, plan, state, prev, batch, batch_d, ascent_device, update_args
    ):
        """A parallel plan, its ascent role's evaluations on ``ascent_device``.

        Those are dispatched first, then the descent device's; the gradients
        then meet on the descent device, where ``tx.update`` applies them. On a
        mesh over several processes, each process's ascent device is its own:
        the replicated state is copied from this process's share, and the
        ascent gradients meet as one row per process, averaged in ``_apply``.
        """
        if self._multiprocess:
            to_ascent = partial(_processes.local_copy, device=ascent_device)
        else:
            to_ascent = partial(self._put, device=ascent_device)
        ascent = []
        for e in plan.on(_plan.ASCENT_DEVICE):
            if e.index is None:
                point = state.params
            else:
                point = self._one_jit("points", self._points)(state)[e.index]
            if e.batch == _plan.ASCENT:  # sliced before it moves: b' examples
                examples = _plan.ascent_subset(batch, self.ascent_batch_size)
            else:
                examples = prev if e.batch == _plan.PREVIOUS else batch_d
            ascent.append(
                self._one_jit("ascent", self._ascent_eval, on_descent=False)(
                    to_ascent(point),
                    to_ascent(state.model_state),
                    self._put(examples, ascent_device),
                )
            )
        descent = self._one_jit("descent", self._descent)(state, prev, batch_d)
        outputs = tuple(out for out, _ in ascent)
        if self._multiprocess:
            outputs = _processes.as_rows(outputs, self._batch_place)
        else:
            outputs = self._put(outputs, self._state_place)
        apply = self._one_jit(
            "apply", self._apply, update_args=update_args, donate=True
        )
        state, metrics = apply(state, descent, outputs)
        # The ascent side's norm stays there: reading it waits for that device.
        for _, norm in ascent:
            metrics["ascent_grad_norm"] = norm
        return state, metrics

    def _ascent_eval(self, point, model_state, batch):
        out = self._value_and_grad(point, model_state, batch)
        norm = f32_global_norm(out[2])
        if self._multiprocess:  # only the gradient travels, as this process's row
            out = (None, None, jax.tree.map(lambda x: x[None], out[2]))
        return out, norm

    def _points(self, state):
        return _plan.evaluation_points(
            self._plan, self.tx, state.params, state.opt_state
        )

    def _descent(self, state, prev, batch):
        """The descent device's evaluations; their points need the state only."""
        points = self._points(state)
        batches = self._batches(prev, batch)
        return tuple(
            self._value_and_grad(points[e.index], state.model_state, batches[e.index])
            for e in self._plan.on(_plan.DESCENT_DEVICE)
        )

    def _apply(self, update_args, state, descent, ascent):
        """``tx.update`` with the gradients already computed, then the step.

        ``descent`` and ``ascent`` are the outputs of the evaluations of each
        device role, in the plan's order.
        """
        plan = self._plan
        if self._multiprocess:  # one row per process: the mean over processes
            ascent = jax.tree.map(lambda x: x.mean(0), ascent)
        outputs = {
            e.index: out
            for role, outs in (
                (_plan.DESCENT_DEVICE, descent),
                (_plan.ASCENT_DEVICE, ascent),
            )
            for e, out in zip(plan.on(role), outs, strict=True)
        }
        updates, opt_state = self._update_from(update_args, state, outputs)
        return self._finish(state, updates, opt_state, outputs, ascent_norms=False)
