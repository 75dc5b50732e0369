"""Orbax checkpoints of the whole training state, plus the replay's frames as write-once chunk files.

Layout of `workdir/checkpoints`:
  <step>/            orbax checkpoint: `state` (every model/optimizer pytree) and `meta` (JSON: position in
                     the schedule, replay size, metrics offset, ...). Orbax writes to a temporary directory
                     and renames it on success, so a kill mid-save leaves no checkpoint that loads half.
  replay/chunk_<k>.npz  the k-th collection's replay rows, written once (tmp file + rename) right after the
                     collection; a checkpoint names how many chunks it covers.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; the message is one line."""


@contextlib.contextmanager
def reading(path: str):
    """Wraps one orbax read of the checkpoint at `path`: any failure becomes a one-line CheckpointError.

    When one array of a damaged checkpoint fails to load, orbax closes its event loop while TensorStore still
    completes the other reads, and their callbacks print an asyncio 'Event loop is closed' traceback from a
    C++ thread, before or after the caller reports the error (seen in CI). So stderr (fd 2) is held in a
    temporary file during the read: replayed if the read succeeds; on failure dropped after a grace period
    that lets the stray callbacks finish into it.
    """
    sys.stderr.flush()
    original = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except Exception as e:  # orbax raises many types for damaged files
            time.sleep(1.0)
            message = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {message})") from None
        else:
            sys.stderr.flush()
            held.seek(0)
            os.write(original, held.read())
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)
            os.close(original)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False, asynchronous: bool = False):
        """The checkpoints in `directory` (created unless read_only; read_only writes nothing, for evaluation).
        asynchronous: `save` returns once its inputs are held (a host copy of the state, a copy of the meta) and
        orbax writes and commits the checkpoint in its own thread while the caller goes on; the next save, and
        `wait`, wait for it. A kill before the commit leaves the previous checkpoint the latest, as with a
        synchronous save killed midway."""
        self.directory = os.path.abspath(directory)
        self.replay_dir = os.path.join(self.directory, "replay")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            verbosity = logging.get_verbosity()
            logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
            try:
                self._manager = ocp.CheckpointManager(self.directory, options=options)
            finally:
                logging.set_verbosity(verbosity)
            return
        os.makedirs(self.replay_dir, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.asynchronous = asynchronous

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Checkpoint `step`: state (a pytree of host arrays the caller no longer changes) and meta (JSON, copied)."""
        meta = json.loads(json.dumps(meta))  # the caller's dict changes on; the written one must not
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                           force=True)
        if not self.asynchronous:
            self._manager.wait_until_finished()

    def wait(self) -> None:
        """Until every save has been written and committed."""
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores into the structure of `abstract_state` (a pytree of arrays or ShapeDtypeStructs)."""
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                                          if not isinstance(x, jax.ShapeDtypeStruct) else x, abstract_state)
        with reading(os.path.join(self.directory, str(step))):
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict:
        """The checkpoint's meta alone (JSON), e.g. to check its format before restoring the state."""
        with reading(os.path.join(self.directory, str(step))):
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def save_replay_chunk(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        path = os.path.join(self.replay_dir, f"chunk_{index}.npz")
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def load_replay_chunk(self, index: int) -> dict[str, np.ndarray]:
        path = os.path.join(self.replay_dir, f"chunk_{index}.npz")
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"replay chunk {path} is missing or unreadable ({type(e).__name__})") from None
