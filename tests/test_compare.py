"""The main job's command line: a tiny run and clear messages for bad options."""

import subprocess
import sys

import pytest

from samx.examples import compare
from samx.examples.data import load_digits, symmetric_noise


def test_tiny_run_prints_a_table(capsys):
    assert compare.main(["--quick", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| SGD |" in out and "| SAM |" in out
    assert "40% symmetric label noise" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "sgd,adamw"], "unknown adamw"),
        (["--noise", "1.5"], "--noise must be in [0, 1]"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--epochs", "many"], "invalid int value"),
    ],
)
def test_bad_options_exit_with_a_message_not_a_traceback(argv, message):
    out = subprocess.run(
        [sys.executable, "-m", "samx.examples.compare", *argv],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_noise_flips_exactly_the_requested_fraction():
    data = load_digits(noise=0.4, seed=1)
    flipped = (data.y_train != data.clean_train).mean()
    assert abs(flipped - 0.4) < 1e-3
    assert set(data.y_train.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="noise"):
        symmetric_noise(data.y_train, -0.1, 10, None)
