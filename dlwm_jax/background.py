"""Work off the loop's critical path (issue 22, step 4): the evaluation of an iteration, its images and the random
agent's baseline run in threads while the loop goes on; what they return is recorded on the loop's thread when it
joins them, which it does before every checkpoint (a checkpoint never holds a run whose evaluation is pending, so
a run killed meanwhile redoes the evaluation on resume) and at the end. So that an evaluation overlaps more than
the next collection, the loop takes no checkpoint after that collection (train.py).

The work itself must only read what nobody changes (frozen copies of parameters, arrays drawn beforehand); its
`finish` then writes records, meta and progress lines on the loop's thread, in the order the work was submitted.
The threads are not daemons: a loop that fails or is interrupted still waits for them before the process ends
(an interpreter torn down under a thread inside XLA or EnvPool may crash on exit). JAX's configuration contexts are
per thread, so the work runs inside `context()`: the loop's (train.py enters jax.threefry_partitionable, which
decides every random draw).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ContextManager


class Background:
    """Runs each submitted `work()` in a thread of its own at once; `join()` waits for all of them in submission
    order and calls each `finish(result)` on the caller's thread (an exception in `work` is raised there)."""

    def __init__(self, context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self._context = context
        self._pending: list[tuple[threading.Thread, dict, Callable[[Any], None]]] = []

    def submit(self, work: Callable[[], Any], finish: Callable[[Any], None]) -> None:
        outcome: dict = {}

        def target() -> None:
            try:
                with self._context():
                    outcome["result"] = work()
            except BaseException as error:  # re-raised by join on the loop's thread
                outcome["error"] = error
        thread = threading.Thread(target=target, name="dlwm-background")
        thread.start()
        self._pending.append((thread, outcome, finish))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def join(self) -> None:
        while self._pending:
            thread, outcome, finish = self._pending.pop(0)
            thread.join()
            if "error" in outcome:
                self._pending.clear()
                raise outcome["error"]
            finish(outcome["result"])
