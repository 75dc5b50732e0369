import os
import sys

import pytest

from dlwm_jax.checkpoint import CheckpointError, reading


def test_reading_replays_stderr_of_a_good_read_and_drops_it_on_failure(capfd):
    with reading("/ckpt/3"):
        print("a warning from the read", file=sys.stderr)
        os.write(2, b"a C-level line\n")
    assert capfd.readouterr().err == "a warning from the read\na C-level line\n"
    with pytest.raises(CheckpointError, match=r"^checkpoint /ckpt/3 is unreadable \(ValueError: bad zarr\)$"):
        with reading("/ckpt/3"):
            os.write(2, b"Traceback (most recent call last):\n")  # what TensorStore's stray callbacks print
            raise ValueError("bad zarr\nsecond line")
    assert capfd.readouterr().err == ""
    print("stderr is back", file=sys.stderr)
    assert capfd.readouterr().err == "stderr is back\n"
