"""Part 4: a measured timeline of a few AsyncSAM steps.

:mod:`samx.examples.timeline`: when the CPU ascent and the accelerator
descent finish, and whether they overlap.
"""

import jax

from samx.examples import timeline
from samx.examples.train import ALL, base_optimizer
from samx.runtime import Trainer


def record_timeline(run, descent, host, params, loss, batches, sizes, calibrated):
    tx = ALL["async_sam"].wrap(base_optimizer(0.01, 10_000))
    trainer = Trainer(
        tx,
        loss,
        descent_device=descent,
        ascent_device=host,
        ascent_batch_size=calibrated,
    )
    state = trainer.init(params)
    for batch in batches[:2]:  # compile, then warm up
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    steps = [batches[i % len(batches)] for i in range(sizes.timeline_steps)]
    _, measured = timeline.record(trainer, state, steps)
    per_step = []
    for step in range(sizes.timeline_steps):
        seg = {s.label: s for s in measured.segments if s.step == step}
        a, d = seg.get("ascent gradient"), seg.get("descent gradient")
        if a is None or d is None:
            continue
        overlap = max(0.0, min(a.end, d.end) - max(a.start, d.start))
        shorter = min(a.end - a.start, d.end - d.start)
        per_step.append(
            {
                "step": step,
                "overlap_s": overlap,
                "overlap_of_shorter": overlap / shorter if shorter > 0 else None,
            }
        )
    value = {
        "ascent_batch_size": calibrated,
        "segments": [s._asdict() for s in measured.segments],
        "dispatches": measured.dispatches,
        "returns": measured.returns,
        "overlap": per_step,
        "note": "only completion times are measured; each start is inferred"
        " (the later of the step's dispatch and the previous completion on that"
        " device), so a segment can include waiting",
    }
    run.part("timeline", value)
    run.log(
        f"timeline: {len(measured.segments)} segments over {sizes.timeline_steps} steps"
    )
    return measured
