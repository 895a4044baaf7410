"""nvJPEG on a real GPU against Pillow, and the executor taking device-decoded pixels
(skipped without CUDA; the decode tests also without a torchvision that works with this torch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker import nvjpeg
from gpuroute_worker.codec import decode_image
from gpuroute_worker.executor import BatchExecutor, CopyStats, to_device_floats
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_psnr, photo

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LIMIT = 1 << 26
H, W = IMAGES["chelsea"]


def _jpeg(array: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _needs_nvjpeg() -> None:
    if not nvjpeg.available(CUDA):
        pytest.skip("torchvision with nvJPEG is not installed for this torch")


@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey", "rotated"])
def test_nvjpeg_matches_pillow(kind: str) -> None:
    _needs_nvjpeg()
    image = photo("chelsea", H, W)
    if kind == "grey":
        data = _jpeg(np.asarray(Image.fromarray(image).convert("L")))
    elif kind == "rotated":
        exif = Image.Exif()
        exif[nvjpeg.ORIENTATION_TAG] = 6
        data = _jpeg(image, exif=exif.tobytes())
    else:
        data = _jpeg(image, progressive=kind == "progressive")
    decoded = nvjpeg.decode_on_device(data, CUDA, max_pixels=LIMIT, keep_metadata=False)
    assert decoded is not None and decoded.pixels.is_cuda
    host = decode_image(data, max_bytes=LIMIT, max_pixels=LIMIT)
    ours, reference = decoded.pixels.cpu(), host.pixels
    assert ours.shape == reference.shape
    # Two decoders: their IDCTs round differently (a level or two) and libjpeg-turbo's "fancy"
    # chroma upsampling is smoother than nvJPEG's at colour edges; a wrong orientation,
    # channel order or colour conversion would sit far below this bound.
    assert_psnr(ours.permute(1, 2, 0).numpy(), reference.permute(1, 2, 0).numpy(), 36.0, f"nvJPEG {kind}")


def test_device_pixels_are_not_copied_again_and_mix_with_host_pixels() -> None:
    image = torch.from_numpy(photo("chelsea", H, W)).permute(2, 0, 1).contiguous()
    stats = CopyStats()
    mixed = to_device_floats([image.to(CUDA), image, image.to(CUDA)], CUDA, stats)
    assert (stats.h2d, stats.h2d_bytes) == (1, image.numel())  # only the host image went up
    assert torch.equal(mixed[0], mixed[1]) and torch.equal(mixed[1], mixed[2])


def test_executor_runs_a_batch_of_device_and_host_images() -> None:
    image = torch.from_numpy(photo("chelsea", H, W)).permute(2, 0, 1).contiguous()
    executor = BatchExecutor(CUDA, None, max_batch=4, max_wait_ms=50.0)
    try:
        steps = normalize_steps([{"op": "invert"}])
        futures = [executor.submit(steps, image.to(CUDA)), executor.submit(steps, image)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        executor.close()
    expected = 255 - image
    for result in results:
        assert torch.equal(result.pixels, expected)
