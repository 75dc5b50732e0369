"""Work off the critical path (background.py): it runs while the caller goes on; join finishes it in order."""
import threading
import time

import pytest

from dlwm_jax.background import Background


def test_work_runs_beside_the_caller_and_join_finishes_in_submission_order():
    background, released, finished = Background(), threading.Event(), []
    background.submit(lambda: (released.wait(5), "slow")[1], finished.append)
    background.submit(lambda: "fast", finished.append)
    time.sleep(0.05)
    assert background.pending == 2 and finished == []  # nothing is recorded before the caller joins
    released.set()  # the caller went on while the first work waited
    background.join()
    assert finished == ["slow", "fast"] and background.pending == 0
    background.join()  # nothing pending: a no-op
    assert finished == ["slow", "fast"]


def test_an_error_in_the_work_is_raised_by_join_on_the_callers_thread():
    background, finished = Background(), []

    def failing():
        raise RuntimeError("envpool broke")
    background.submit(failing, finished.append)
    background.submit(lambda: "never finished", finished.append)
    with pytest.raises(RuntimeError, match="envpool broke"):
        background.join()
    assert finished == [] and background.pending == 0
