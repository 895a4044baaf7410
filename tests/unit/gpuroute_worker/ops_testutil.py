"""Shared helpers for the op and SR tests: reference images, conversions, PSNR.

Not a test module (no test_ prefix); the test files import it as
tests.unit.gpuroute_worker.ops_testutil (every tests folder is a package).
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from PIL import Image


def _textured(height: int, width: int, seed: int) -> np.ndarray:
    """Deterministic photo-like stand-in: smooth gradients, edges, texture and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [
            0.5 + 0.4 * np.sin(xx / 7.0 + yy / 11.0),
            0.5 + 0.4 * np.cos(xx / 5.0 - yy / 9.0) * np.sin(yy / 13.0),
            (xx + yy) / (width + height),
        ],
        axis=-1,
    )
    base[(xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(height, width) / 4) ** 2] *= 0.4
    base += rng.normal(0.0, 0.04, base.shape)
    return np.clip(np.round(base * 255.0), 0, 255).astype(np.uint8)


def photo(name: str, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 centre crop of a scikit-image sample photograph, or a textured stand-in."""
    try:
        from skimage import data
    except ImportError:
        return _textured(height, width, seed=sum(map(ord, name)))
    full = getattr(data, name)()[..., :3]
    y0 = (full.shape[0] - height) // 2
    x0 = (full.shape[1] - width) // 2
    return np.ascontiguousarray(full[y0 : y0 + height, x0 : x0 + width])


def to_tensor(array: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float().div(255.0).to(device)


def to_uint8(x: torch.Tensor, index: int = 0) -> np.ndarray:
    """One image of a (N, 3, H, W) float batch -> (H, W, 3) uint8, rounded as the worker encodes."""
    return x[index].detach().float().cpu().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB; inf when identical."""
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def assert_psnr(ours: np.ndarray, reference: np.ndarray, bound: float, what: str) -> float:
    value = psnr(ours, reference)
    assert value >= bound, f"{what}: PSNR {value:.2f} dB vs reference, below the {bound} dB bound"
    return value


def assert_equal(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    diff = np.count_nonzero(ours != reference)
    assert diff == 0, (
        f"{what}: {diff} of {ours.size} values differ (PSNR {psnr(ours, reference):.2f} dB), "
        f"max |diff| {int(np.abs(ours.astype(int) - reference.astype(int)).max())}"
    )


IMAGES = {"astronaut": (96, 128), "chelsea": (97, 131)}
"""Test crops: one even-sized, one odd-sized."""


def save_published(module: torch.nn.Module, path: os.PathLike[str] | str, key: str | None = "params_ema") -> str:
    """Save weights as Real-ESRGAN publishes them ({key: state_dict}, or bare); returns the file's sha256."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save({key: state} if key else state, path)
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()
