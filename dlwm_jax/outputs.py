"""What a run writes beside its checkpoints, per seed directory: metrics.jsonl and TensorBoard (`Logger`, with
the progress lines), reconstructions and dreams (`save_images`), the learning curve and summary.json."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from dlwm_jax import viz
from dlwm_jax import world_model as wm
from dlwm_jax.imagination import imagine
from dlwm_jax.networks.distributions import continuous_bernoulli_mean


class NonFiniteError(RuntimeError):
    """A loss became NaN/inf; nothing of the failing phase is saved."""


class Logger:
    """metrics.jsonl + TensorBoard of one seed; progress lines with elapsed time and ETA."""

    def __init__(self, workdir: str, metrics_offset: int, log_step: int, echo: Callable[[str], None]):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):  # drop lines a killed run wrote after its last checkpoint
            with open(self.path, "r+b") as f:
                f.truncate(metrics_offset)
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(workdir, purge_step=log_step if log_step else None)
        self.log_step = log_step
        self.echo = echo
        self.phase_start = self.last_echo = time.time()

    @property
    def offset(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def write(self, record: dict) -> None:
        for k, v in record.items():
            if isinstance(v, float) and not math.isfinite(v) and k not in ("eval_return_std",):
                raise NonFiniteError(f"non-finite {k}={v} in phase {record.get('phase')} of iteration "
                                     f"{record.get('iteration')}; nothing of this phase was saved")
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("iteration", "real_steps", "unit"):
                self.writer.add_scalar(f"{record['phase']}/{k}", v, self.log_step)
        self.writer.flush()
        self.log_step += 1

    def start_phase(self) -> None:
        self.phase_start = self.last_echo = time.time()

    def heartbeat(self, iteration: int, num_iterations: int, phase: str, epoch: int, epochs: int, every_s: float = 30.0):
        """A progress callback for world-model epochs: a line at most every `every_s` seconds inside an epoch."""
        def callback(kind: str, step: int, metrics) -> None:
            if time.time() - self.last_echo >= every_s:
                self.last_echo = time.time()
                done = epoch + 0.5  # mid-epoch: the ETA assumes half of this epoch is done
                self.progress(iteration, num_iterations, phase, done, epochs, f"epoch {epoch + 1}: {kind} step {step + 1}")
        return callback

    def progress(self, iteration: int, num_iterations: int, phase: str, done: float, total: int, extra: str = "") -> None:
        elapsed = time.time() - self.phase_start
        eta = elapsed / done * (total - done) if done else float("nan")
        self.last_echo = time.time()
        self.echo(f"[iter {iteration + 1}/{num_iterations}] {phase:<11} {done:g}/{total}  elapsed {elapsed:6.0f}s"
                  f"  eta {eta:6.0f}s  {extra}")


def short(metrics: dict) -> str:
    """The few metrics a progress line shows."""
    keys = ("recon_nll", "next_latent_loss", "next_latent_acc", "reward_loss", "policy_loss", "entropy")
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def params_hash(tree: Any) -> str:
    """SHA-256 over the bytes of every leaf, in tree order: equal hashes mean bit-identical parameters."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def state_hashes(world: wm.WorldModelState, agent_params: Any) -> dict[str, str]:
    """params_hash of every trained part of one seed (summary.json's "hashes")."""
    return {"encoder": params_hash((world.encoder_params, world.encoder_batch_stats)),
            "decoder": params_hash(world.decoder_params), "codebook": params_hash(world.codebook),
            "dynamics": params_hash(world.dynamics_params), "policy": params_hash(agent_params)}


def write_summary(seed_dir: str, game: str, seed: int, real_steps: int, final_return: float | None,
                  world: wm.WorldModelState, agent_params: Any) -> dict:
    """summary.json of one seed: the final evaluation return and a hash of every trained part."""
    summary = {"game": game, "seed": seed, "real_steps": real_steps, "final_eval_return_mean": final_return,
               "hashes": state_hashes(world, agent_params)}
    with open(os.path.join(seed_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


@functools.partial(jax.jit, static_argnums=0)
def decode_mean(decoder, decoder_params, z_q: jax.Array) -> jax.Array:
    """Latents [B, 6, 6, D] -> the continuous Bernoulli mean [B, 96, 96, C] (images only, SPEC 3.6)."""
    return continuous_bernoulli_mean(decoder.apply({"params": decoder_params}, z_q))


dream = jax.jit(imagine, static_argnames=("dynamics", "actor_critic", "horizon"))
encode = jax.jit(wm.encode)


class ImageSamples(NamedTuple):
    """What `save_images` draws from the replay, drawn beforehand (the replay grows while images are made off the
    loop's path): observations uint8 [n <= 6, 96, 96, C] to reconstruct, dream starts [<= 4, ...], the dream key."""
    observations: np.ndarray
    starts: np.ndarray
    dream_key: jax.Array


def image_samples(replay, key: jax.Array) -> ImageSamples:
    obs_key, start_key, dream_key = jax.random.split(key, 3)
    return ImageSamples(replay.sample_observations(obs_key, min(6, len(replay))),
                        replay.sample_observations(start_key, min(4, len(replay))), dream_key)


def save_images(seed_dir: str, iteration: int, world: wm.WorldModelState, agent_params: Any, samples: ImageSamples,
                networks, config) -> None:
    """Reconstructions with code maps, and a decoded dream (the reference's latent analysis and dreams)."""
    observations, start, dream_key = samples
    indices, z_q = encode(world, observations)
    recon = decode_mean(networks.decoder, world.decoder_params, z_q)
    grid = viz.reconstruction_grid(observations, np.asarray(recon), np.asarray(indices), config.vqvae.num_codes)
    viz.save_png(os.path.join(seed_dir, f"reconstructions_iter{iteration + 1}.png"), grid)

    start_indices, _ = encode(world, start)
    rollout = dream(dynamics=networks.dream_dynamics, actor_critic=networks.actor_critic,
                    dynamics_params={"params": world.dynamics_params}, policy_params=agent_params,
                    embeddings=world.codebook.embeddings, start_indices=start_indices, key=dream_key,
                    horizon=config.policy.horizon)
    t, b = rollout.indices.shape[:2]
    frames = decode_mean(networks.decoder, world.decoder_params,
                         world.codebook.embeddings[rollout.indices.reshape(t * b, *rollout.indices.shape[2:])])
    frames = np.asarray(frames[..., -1]).reshape(t, b, *frames.shape[1:3])
    viz.save_gif(os.path.join(seed_dir, f"dream_iter{iteration + 1}.gif"),
                 viz.dream_frames(frames, np.asarray(rollout.rewards)))


def save_learning_curve(seed_dir: str, history: list, title: str) -> None:
    """learning_curve.png from a seed's [[real steps, return mean, return std], ...]."""
    steps, means, stds = zip(*history)
    viz.save_learning_curve(os.path.join(seed_dir, "learning_curve.png"), list(steps), list(means), list(stds), title)
