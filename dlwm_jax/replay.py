"""Host-side (numpy) store of real trajectories, with on-the-fly frame stacking (SPEC 2).

Layout. Every frame is stored once, uint8 [capacity, H, W] (H = W = 96). Per step t we also keep action[t]
(int32), reward[t] (float32, raw score), terminal[t] (bool), episode_start[t] (bool: frame t is the first of
an episode) and prev[t] (index of the same env stream's previous step, -1 for the stream's first step).
The collector hands over one chunk per iteration with N env streams (SPEC 8.3); each stream's chunk is stored
contiguously as ONE trajectory (SPEC 2). Nothing is ever evicted.

Frame stacking (SPEC 1.4, gym FrameStack). observation[t] = frames of steps t-C+1..t of the same stream,
oldest in channel 0, where frames before the episode's first frame are replaced by that first frame. Because
the real env is never reset between iterations (SPEC 2, 8.3), the stack at a chunk's first step continues the
stream's previous chunk: walking `prev` (which crosses chunks) and stopping at `episode_start` handles both.

Sampling takes an explicit jax key, turned into a numpy Generator (`_generator`), so every order is a
deterministic function of the key (Project decisions: Determinism). Batches always have the full batch size,
so jitted steps see one shape; a partial last batch is padded by repeating the epoch's first indices and
flagged by `valid` [B] (False rows must be masked out of losses/statistics by the consumer).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ObservationBatch(NamedTuple):
    """VQ-VAE minibatch (SPEC 2, 3.7)."""
    observations: np.ndarray  # uint8 [B, H, W, C]
    valid: np.ndarray         # bool [B]; False rows are padding (only in an epoch's last batch)


class ObservationPlan(NamedTuple):
    """The frame indices of an epoch's VQ-VAE batches (what `observation_batches` gathers), for a gather elsewhere
    (device_replay.gather)."""
    frames: np.ndarray  # int32 [N, B, C]: frame indices of each batch row's stack, oldest first
    valid: np.ndarray   # bool [N, B]


class SequencePlan(NamedTuple):
    """An epoch's dynamics batches (what `sequence_batches` yields) with frame indices in place of frames."""
    frames: np.ndarray     # int32 [N, T, B, C]
    actions: np.ndarray    # int32 [N, T, B]
    rewards: np.ndarray    # float32 [N, T, B], raw
    terminals: np.ndarray  # bool [N, T, B]
    valid: np.ndarray      # bool [N, B]


class SequenceBatch(NamedTuple):
    """Dynamics minibatch, time-major (SPEC 2, 4.6)."""
    observations: np.ndarray  # uint8 [T, B, H, W, C]
    actions: np.ndarray       # int32 [T, B]
    rewards: np.ndarray       # float32 [T, B], raw
    terminals: np.ndarray     # bool [T, B]
    valid: np.ndarray         # bool [B]; False columns are padding (only in an epoch's last batch)


def _generator(key: jax.Array | np.random.Generator) -> np.random.Generator:
    """A numpy Generator seeded deterministically from a jax key (raw uint32[2] or typed); a Generator (from
    `generators`) is returned as it is."""
    if isinstance(key, np.random.Generator):
        return key
    return np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))


@jax.jit
def _key_bits(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.bits(k, (4,), jnp.uint32))(keys.reshape(-1))


def generators(keys: jax.Array) -> list[np.random.Generator]:
    """The Generators `_generator` makes for each of the typed keys [...] (flattened, in order), with one device
    program and one transfer for all of them: the loop draws a phase's host-side randomness up front, so that no
    step waits for the device to hand over a key while the device has queued work."""
    return [np.random.default_rng(bits) for bits in np.asarray(_key_bits(keys))]


def window_starts(rng: np.random.Generator, trajectory_starts: np.ndarray, trajectory_lengths: np.ndarray,
                  length: int, max_offset: int) -> np.ndarray:
    """Shuffled start indices of non-overlapping windows, one epoch (SPEC 2, steps 1-4, drop_last_time).

    Per trajectory with len >= length: offset ~ U{0..min(max_offset, max(len - length - 1, 0))}; windows start at
    offset + k*length and must end inside the trajectory, so there are floor((len - offset) / length) of them.
    Returns int64 [num_windows] global step indices.
    """
    starts = []
    for begin, size in zip(trajectory_starts.tolist(), trajectory_lengths.tolist()):
        if size < length:
            continue
        offset = int(rng.integers(0, min(max_offset, max(size - length - 1, 0)) + 1))
        count = (size - offset) // length
        starts.append(begin + offset + length * np.arange(count, dtype=np.int64))
    starts = np.concatenate(starts) if starts else np.zeros((0,), np.int64)
    return rng.permutation(starts)


def _pad(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads [n] indices to a multiple of batch_size by repeating from the front; returns (indices, valid)."""
    n = len(indices)
    pad = -n % batch_size
    valid = np.arange(n + pad) < n
    return np.concatenate([indices, np.resize(indices, pad)]), valid


class Replay:
    """Preallocated trajectory store. `len(replay)` = steps stored; `nbytes` = bytes of all arrays."""

    def __init__(self, capacity: int, num_streams: int = 1, frame_shape: tuple[int, int] = (96, 96),
                 frame_stack: int = 4):
        self.capacity, self.num_streams, self.frame_stack = int(capacity), int(num_streams), int(frame_stack)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self._frames = np.zeros((self.capacity, *self.frame_shape), np.uint8)
        self._actions = np.zeros((self.capacity,), np.int32)
        self._rewards = np.zeros((self.capacity,), np.float32)
        self._terminals = np.zeros((self.capacity,), bool)
        self._episode_starts = np.zeros((self.capacity,), bool)
        self._prev = np.full((self.capacity,), -1, np.int64)
        self._size = 0
        self._stream_last = np.full((self.num_streams,), -1, np.int64)  # last stored step per stream
        self._trajectory_starts = np.zeros((0,), np.int64)
        self._trajectory_lengths = np.zeros((0,), np.int64)

    # ----------------------------------------------------------------------------------------- storage
    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._frames, self._actions, self._rewards, self._terminals,
                                      self._episode_starts, self._prev))

    @property
    def num_trajectories(self) -> int:
        return len(self._trajectory_starts)

    def add(self, frames: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminals: np.ndarray,
            episode_starts: np.ndarray) -> None:
        """Appends one collection chunk: each of the N streams becomes one trajectory of T steps (SPEC 2).

        frames uint8 [N, T, H, W] (newest frame of observation[t]); actions [N, T]; rewards [N, T];
        terminals [N, T]; episode_starts bool [N, T] (observation[t] is an episode's first). Consistency is
        checked: episode_starts[t+1] == terminals[t], also across the chunk boundary of each stream (the env
        is never reset between chunks). A stream's very first step is always an episode start.
        """
        frames = np.asarray(frames)
        n, t = frames.shape[:2]
        if n != self.num_streams or frames.shape[2:] != self.frame_shape or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [{self.num_streams}, T, {self.frame_shape}], "
                             f"got {frames.dtype} {frames.shape}")
        fields = [np.asarray(a) for a in (actions, rewards, terminals, episode_starts)]
        if any(a.shape != (n, t) for a in fields):
            raise ValueError(f"actions/rewards/terminals/episode_starts must be [{n}, {t}], "
                             f"got {[a.shape for a in fields]}")
        actions, rewards, terminals, episode_starts = fields
        terminals, episode_starts = terminals.astype(bool), episode_starts.astype(bool).copy()
        if self._size + n * t > self.capacity:
            raise ValueError(f"replay full: {self._size} + {n * t} > capacity {self.capacity}")
        # Continuity with the stream's previous chunk (SPEC 2: no reset between iterations).
        has_prev = self._stream_last >= 0
        previous_terminal = self._terminals[self._stream_last]
        expected_first = np.where(has_prev, previous_terminal, True)
        if (episode_starts[has_prev, 0] != expected_first[has_prev]).any() or \
                (episode_starts[:, 1:] != terminals[:, :-1]).any():
            raise ValueError("episode_starts inconsistent with terminals (episode_starts[t+1] must equal "
                             "terminals[t], across chunks too)")
        episode_starts[~has_prev, 0] = True

        begins = self._size + t * np.arange(n, dtype=np.int64)
        flat = slice(self._size, self._size + n * t)
        self._frames[flat] = frames.reshape(n * t, *self.frame_shape)
        self._actions[flat] = actions.reshape(-1)
        self._rewards[flat] = rewards.reshape(-1)
        self._terminals[flat] = terminals.reshape(-1)
        self._episode_starts[flat] = episode_starts.reshape(-1)
        prev = begins[:, None] + np.arange(-1, t - 1)[None, :]  # [N, T]: previous step of the same stream
        prev[:, 0] = self._stream_last
        self._prev[flat] = prev.reshape(-1)
        self._stream_last = begins + t - 1
        self._trajectory_starts = np.concatenate([self._trajectory_starts, begins])
        self._trajectory_lengths = np.concatenate([self._trajectory_lengths, np.full((n,), t, np.int64)])
        self._size += n * t

    # ------------------------------------------------------------------------------------ gathering
    def stack_indices(self, indices: np.ndarray) -> np.ndarray:
        """int [...] step indices -> int64 [..., C] frame indices of their stacks, oldest first (SPEC 1.4)."""
        current = np.asarray(indices, np.int64)
        if current.size and (current.min() < 0 or current.max() >= self._size):
            raise IndexError(f"step index out of range [0, {self._size})")
        stack = [current]
        for _ in range(self.frame_stack - 1):  # step back, but never past the episode's first frame
            current = np.where(self._episode_starts[current], current, self._prev[current])
            stack.append(current)
        return np.stack(stack[::-1], axis=-1)

    def observations(self, indices: np.ndarray) -> np.ndarray:
        """int [...] step indices -> stacked observations uint8 [..., H, W, C] (NHWC, oldest in channel 0)."""
        return self.gather(self.stack_indices(indices))

    def gather(self, stack: np.ndarray) -> np.ndarray:
        """int [..., C] frame indices (stack_indices) -> uint8 [..., H, W, C]; device_replay.gather on the device."""
        out = np.empty((*stack.shape[:-1], *self.frame_shape, self.frame_stack), np.uint8)
        for c in range(self.frame_stack):  # channel by channel: faster than copying one gather with its axis moved
            out[..., c] = self._frames[stack[..., c]]
        return out

    @property
    def frames(self) -> np.ndarray:
        """uint8 [len, H, W]: every stored frame (a view)."""
        return self._frames[:self._size]

    def sequences(self, starts: np.ndarray, length: int) -> SequenceBatch:
        """int [B] window starts -> time-major SequenceBatch of steps start..start+length-1 (valid all True)."""
        steps = np.asarray(starts, np.int64)[None, :] + np.arange(length)[:, None]  # [T, B]
        return SequenceBatch(self.observations(steps), self._actions[steps], self._rewards[steps],
                             self._terminals[steps], np.ones((steps.shape[1],), bool))

    # ------------------------------------------------------------------------------------- sampling
    def num_observation_batches(self, batch_size: int) -> int:
        """Batches in one `observation_batches` pass: ceil(len / batch_size) (last partial batch kept)."""
        return -(-self._size // batch_size)

    def observation_plan(self, key: jax.Array, batch_size: int = 40) -> ObservationPlan:
        """One full shuffled pass over all stored observations (SPEC 2, VQ-VAE use: window 1, no offset), as the
        frame indices of ceil(len / batch_size) batches; the last is padded (valid False)."""
        order, valid = _pad(_generator(key).permutation(self._size), batch_size)
        return ObservationPlan(self.stack_indices(order).astype(np.int32).reshape(-1, batch_size, self.frame_stack),
                               valid.reshape(-1, batch_size))

    def observation_batches(self, key: jax.Array, batch_size: int = 40) -> Iterator[ObservationBatch]:
        """`observation_plan`'s batches gathered here: ObservationBatch(observations uint8 [B, H, W, C], valid [B])."""
        plan = self.observation_plan(key, batch_size)  # drawn now, not at first next()
        return (ObservationBatch(self.gather(frames), valid) for frames, valid in zip(*plan))

    def sequence_starts(self, key: jax.Array, length: int = 11, max_offset: int = 10) -> np.ndarray:
        """Shuffled window starts of one dynamics epoch, int64 [num_windows] (SPEC 2; see `window_starts`)."""
        return window_starts(_generator(key), self._trajectory_starts, self._trajectory_lengths, length,
                             max_offset)

    def num_sequence_batches(self, key: jax.Array, batch_size: int = 4, length: int = 11,
                             max_offset: int = 10) -> int:
        """Batches `sequence_batches` yields for the same arguments: ceil(num_windows / batch_size) (SPEC 8.4)."""
        return -(-len(self.sequence_starts(key, length, max_offset)) // batch_size)

    def sequence_plan(self, key: jax.Array, batch_size: int = 4, length: int = 11,
                      max_offset: int = 10) -> SequencePlan:
        """One dynamics epoch (SPEC 2, dynamics use; drop_last_time, last partial batch kept and padded), with
        frame indices [N, T, B, C] in place of observations. Windows never cross trajectory (chunk) boundaries but
        may cross episode boundaries."""
        starts, valid = _pad(self.sequence_starts(key, length, max_offset), batch_size)
        steps = starts.reshape(-1, 1, batch_size) + np.arange(length)[None, :, None]  # [N, T, B]
        return SequencePlan(self.stack_indices(steps).astype(np.int32), self._actions[steps], self._rewards[steps],
                            self._terminals[steps], valid.reshape(-1, batch_size))

    def sequence_batches(self, key: jax.Array, batch_size: int = 4, length: int = 11,
                         max_offset: int = 10) -> Iterator[SequenceBatch]:
        """`sequence_plan`'s batches gathered here: SequenceBatch with observations uint8 [T, B, H, W, C],
        actions/rewards/terminals [T, B], valid bool [B]."""
        plan = self.sequence_plan(key, batch_size, length, max_offset)  # drawn now
        return (SequenceBatch(self.gather(frames), *rest) for frames, *rest in zip(*plan))

    def window_starts_from(self, key: jax.Array, count: int, length: int, first_step: int = 0) -> np.ndarray:
        """Up to `count` distinct random starts of `length`-step windows that begin at or after `first_step`, lie
        in one trajectory and cross no episode end (no terminal among their first length-1 steps): int64 [<= count].

        The diagnostics' windows of data the world model has not trained on (first_step = start of a fresh chunk).
        """
        starts = np.arange(first_step, self._size - length + 1, dtype=np.int64)
        if len(starts) == 0:
            return starts
        trajectory = np.searchsorted(self._trajectory_starts, np.arange(self._size), side="right") - 1
        ends_before = np.concatenate([[0], np.cumsum(self._terminals[:self._size])])  # terminals in [0, i)
        ok = (trajectory[starts] == trajectory[starts + length - 1]) & \
             (ends_before[starts + length - 1] == ends_before[starts])
        candidates = starts[ok]
        return np.sort(_generator(key).choice(candidates, min(count, len(candidates)), replace=False))

    def sample_stacks(self, key: jax.Array | np.random.Generator, n: int = 16) -> np.ndarray:
        """n distinct steps uniformly from the whole buffer -> their frame indices int32 [n, C] (start states,
        SPEC 2, 6), for a gather here (`sample_observations`) or on the device (device_replay.gather)."""
        if n > self._size:
            raise ValueError(f"cannot draw {n} distinct observations from {self._size}")
        return self.stack_indices(_generator(key).choice(self._size, n, replace=False)).astype(np.int32)

    def sample_observations(self, key: jax.Array | np.random.Generator, n: int = 16) -> np.ndarray:
        """`sample_stacks` gathered here: uint8 [n, H, W, C]."""
        return self.gather(self.sample_stacks(key, n))

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """The filled part and bookkeeping, as numpy arrays (for checkpoint.py); restores exactly."""
        n = self._size
        return {"frames": self._frames[:n], "actions": self._actions[:n], "rewards": self._rewards[:n],
                "terminals": self._terminals[:n], "episode_starts": self._episode_starts[:n],
                "prev": self._prev[:n], "stream_last": self._stream_last.copy(),
                "trajectory_starts": self._trajectory_starts.copy(),
                "trajectory_lengths": self._trajectory_lengths.copy(),
                "capacity": np.asarray(self.capacity, np.int64),
                "frame_stack": np.asarray(self.frame_stack, np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replaces the contents with `state` (same frame shape and stream count; capacity must suffice)."""
        n = len(state["frames"])
        if n > self.capacity or tuple(state["frames"].shape[1:]) != self.frame_shape or \
                len(state["stream_last"]) != self.num_streams or int(state["frame_stack"]) != self.frame_stack:
            raise ValueError("state_dict does not fit this Replay (capacity, frame shape, streams or stack)")
        for name in ("frames", "actions", "rewards", "terminals", "episode_starts", "prev"):
            getattr(self, "_" + name)[:n] = state[name]
        self._size = n
        self._stream_last = np.asarray(state["stream_last"], np.int64).copy()
        self._trajectory_starts = np.asarray(state["trajectory_starts"], np.int64).copy()
        self._trajectory_lengths = np.asarray(state["trajectory_lengths"], np.int64).copy()

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], capacity: int | None = None) -> "Replay":
        """A new Replay holding `state`; capacity defaults to the saved one."""
        frames = np.asarray(state["frames"])
        replay = cls(int(state["capacity"]) if capacity is None else capacity,
                     num_streams=len(state["stream_last"]), frame_shape=frames.shape[1:],
                     frame_stack=int(state["frame_stack"]))
        replay.load_state_dict(state)
        return replay
