"""Images a researcher looks at: reconstructions with their latent code maps (the reference's "latent
analysis"), decoded imagined rollouts (its "dreams") and the learning curve. Host-side numpy + Pillow."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

_SCALE = 3  # upscale factor for the small 96x96 frames


def _code_map(indices: np.ndarray, num_codes: int, size: int) -> np.ndarray:
    """Latent indices [6, 6] -> an RGB image [size, size, 3], one colour per code (a fixed golden-ratio hue)."""
    hue = (np.arange(num_codes) * 0.618034) % 1.0
    rgb = np.stack([np.abs(hue * 6 - 3) - 1, 2 - np.abs(hue * 6 - 2), 2 - np.abs(hue * 6 - 4)], -1)
    palette = (np.clip(rgb, 0, 1) * 200 + 40).astype(np.uint8)
    image = palette[indices]
    reps = size // indices.shape[0]
    return np.repeat(np.repeat(image, reps, 0), reps, 1)


def _gray(frame: np.ndarray) -> np.ndarray:
    return np.repeat(frame[..., None], 3, -1)


def reconstruction_grid(frames: np.ndarray, reconstructions: np.ndarray, indices: np.ndarray, num_codes: int) -> np.ndarray:
    """Rows of [real newest frame | reconstruction (distribution mean) | latent code map] as uint8 RGB.

    frames uint8 [N, 96, 96, C]; reconstructions float [N, 96, 96, C] in [0, 1]; indices int [N, 6, 6].
    """
    rows = []
    for real, recon, idx in zip(frames, reconstructions, indices):
        size = real.shape[0]
        recon_u8 = (np.clip(recon[..., -1], 0, 1) * 255).astype(np.uint8)
        rows.append(np.concatenate([_gray(real[..., -1]), _gray(recon_u8), _code_map(idx, num_codes, size)], 1))
    grid = np.concatenate(rows, 0)
    return np.repeat(np.repeat(grid, _SCALE, 0), _SCALE, 1)


def save_png(path: str, image: np.ndarray) -> None:
    _atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_gif(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """frames uint8 [T, H, W] or [T, H, W, 3]."""
    images = [Image.fromarray(np.repeat(np.repeat(f, _SCALE, 0), _SCALE, 1)) for f in frames]
    _atomic(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                             duration=int(1000 / fps), loop=0))


def dream_frames(decoded: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Decoded imagined frames [T, N, 96, 96] in [0, 1] and rewards [T, N] -> GIF frames [T, 96, N*96, 3]:
    the N rollouts side by side, a green/red bar under a frame whose imagined reward is +1/-1."""
    t, n, h, w = decoded.shape
    out = np.repeat((np.clip(decoded, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
    out[:, :, -4:, :, :] = 0
    out[:, :, -4:, :, 1] = np.where(rewards > 0, 255, 0)[:, :, None, None]
    out[:, :, -4:, :, 0] = np.where(rewards < 0, 255, 0)[:, :, None, None]
    return out.transpose(0, 2, 1, 3, 4).reshape(t, h, n * w, 3)


def save_learning_curve(path: str, real_steps: list[int], means: list[float], stds: list[float], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    steps, mean, std = np.asarray(real_steps), np.asarray(means, float), np.asarray(stds, float)
    ax.plot(steps, mean, marker="o")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("real interactions")
    ax.set_ylabel("evaluation return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _atomic(path: str, write) -> None:
    """Write to a temporary name and rename, so a killed run never leaves half an image."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
