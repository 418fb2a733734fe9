"""Part 2: AsyncSAM's ascent batch b', calibrated on the CNN.

:func:`samx.runtime.calibrate_ascent_batch`: candidate b' on the host CPU
timed against the descent gradient on the accelerator, and the transfers
between them.
"""

import warnings

from samx.examples.stepwise import device_name
from samx.runtime import AscentBatchCalibration, calibrate_ascent_batch


def calibrated(loss, params, batch, descent, host, repeats: int):
    """``(calibration, warned)``: the calibration, and whether it warned that
    even b' = 1 does not hide behind the descent.

    That warning is recorded (``hides`` is False, ``warned`` True), not
    printed: the sweep would repeat it for every width. Other warnings pass.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = calibrate_ascent_batch(
            loss,
            params,
            batch,
            fast_device=descent,
            slow_device=host,
            repeats=repeats,
        )
    warned = False
    for w in caught:
        if issubclass(w.category, UserWarning) and "does not hide" in str(w.message):
            warned = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return c, warned


def as_record(c: AscentBatchCalibration, warned: bool) -> dict:
    """What the JSON keeps of a calibration."""
    return {
        "batch_size": c.batch_size,
        "ascent_batch_size": c.ascent_batch_size,
        "descent_device": device_name(c.fast_device),
        "ascent_device": device_name(c.slow_device),
        "descent_seconds": c.descent_seconds,
        "host_seconds_per_example": c.slow_seconds_per_example,
        "transfer_seconds": c.transfer_seconds,
        "hides": bool(c.hides),
        "warned_no_hiding": warned,
        "ascent_seconds": {str(k): v for k, v in c.ascent_seconds.items()},
    }


def describe(c: dict) -> str:
    """One line of a calibration's record, in milliseconds."""
    return (
        f"b' = {c['ascent_batch_size']} of {c['batch_size']}"
        f" ({'hides' if c['hides'] else 'does not hide'}): descent"
        f" {c['descent_seconds'] * 1e3:.2f} ms on {c['descent_device']};"
        f" transfers {c['transfer_seconds'] * 1e3:.2f} ms; ascent on"
        f" {c['ascent_device']}: "
        + ", ".join(f"b'={k}: {v * 1e3:.2f} ms" for k, v in c["ascent_seconds"].items())
    )


def calibrate(run, descent, host, params, loss, batch, sizes) -> int:
    """Part 2: the calibrated b', recorded."""
    c, warned = calibrated(loss, params, batch, descent, host, sizes.repeats)
    record = as_record(c, warned)
    run.part("calibration", record)
    run.log(f"calibrated {describe(record)}")
    return c.ascent_batch_size
