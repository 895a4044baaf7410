"""Which JPEGs the nvJPEG path takes, and that it hands back what the host path would.

Runs on the CPU: the header probe, the orientation and the checks around the decoder are
plain torch and Pillow. The decoder itself (torchvision's nvJPEG) needs a GPU; here a
Pillow decode stands in for it, so these tests check everything around the device call
(test_nvjpeg_gpu.py runs the real one against Pillow).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gpuroute_worker import nvjpeg
from gpuroute_worker.codec import decode_image
from tests.unit.gpuroute_worker.icc_testutil import display_p3

ORIENTATION = 0x0112
CPU = torch.device("cpu")
LIMIT = 1 << 24


def _jpeg(mode: str = "RGB", *, h: int = 24, w: int = 40, seed: int = 0, **options: object) -> bytes:
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


def _with_orientation(orientation: int, **extra: object) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "gpuroute camera"  # Make: a tag that must survive keepMetadata
    return _jpeg(exif=exif.tobytes(), **extra)


def pillow_decoder(data: torch.Tensor, grey: bool, device: torch.device) -> torch.Tensor:
    """Stands in for nvJPEG on the CPU: the stored (un-oriented) pixels, as decode_jpeg returns them."""
    image = Image.open(io.BytesIO(data.numpy().tobytes()))
    array = np.asarray(image.convert("L" if grey else "RGB"))
    tensor = torch.from_numpy(array.copy())
    return (tensor[None] if grey else tensor.permute(2, 0, 1)).to(device)


def _mpo() -> bytes:
    first = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[first.copy()])
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "data", "eligible"), [
    ("baseline RGB", _jpeg(), True),
    ("progressive RGB", _jpeg(progressive=True), True),
    ("grey", _jpeg("L"), True),
    ("rotated by EXIF", _with_orientation(6), True),
    ("CMYK (needs Pillow's conversion)", _jpeg("CMYK"), False),
    ("Display P3 profile (needs littleCMS)", _jpeg(icc_profile=display_p3()), False),
    ("MPO (several frames)", _mpo(), False),
    ("PNG", _png(), False),
    ("truncated", _jpeg()[:60], False),
    ("not an image", b"\xff\xd8 nothing more", False),
])
def test_eligibility(name: str, data: bytes, eligible: bool) -> None:
    header = nvjpeg.probe(data, max_pixels=LIMIT, keep_metadata=False)
    assert (header is not None) is eligible, name


def test_an_oversized_jpeg_is_left_to_the_host_decoder_and_its_message() -> None:
    data = _jpeg(h=30, w=30)
    assert nvjpeg.probe(data, max_pixels=899, keep_metadata=False) is None
    assert nvjpeg.probe(data, max_pixels=900, keep_metadata=False) is not None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_pixels_as_exif_transpose_does(orientation: int) -> None:
    array = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    image.getexif()[ORIENTATION] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = nvjpeg.orient(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("keep_metadata", [False, True])
def test_device_path_gives_what_the_host_path_gives(orientation: int, keep_metadata: bool) -> None:
    data = _with_orientation(orientation, h=18, w=30)
    on_device = nvjpeg.decode_on_device(data, CPU, max_pixels=LIMIT, keep_metadata=keep_metadata,
                                        decoder=pillow_decoder)
    host = decode_image(data, max_bytes=LIMIT, max_pixels=LIMIT, keep_metadata=keep_metadata)
    assert on_device is not None
    assert torch.equal(on_device.pixels, host.pixels)
    assert (on_device.width, on_device.height) == (host.width, host.height)
    assert on_device.icc is None and host.icc is None
    assert on_device.exif == host.exif
    if keep_metadata:
        kept = Image.Exif()
        kept.load(on_device.exif or b"")
        assert ORIENTATION not in kept and kept[0x010F] == "gpuroute camera"


def test_grey_stays_one_channel() -> None:
    data = _jpeg("L")
    decoded = nvjpeg.decode_on_device(data, CPU, max_pixels=LIMIT, keep_metadata=False, decoder=pillow_decoder)
    assert decoded is not None and decoded.pixels.shape == (1, 24, 40)
    assert torch.equal(decoded.pixels, decode_image(data, max_bytes=LIMIT, max_pixels=LIMIT).pixels)


def test_a_decoder_failure_or_a_wrong_shape_falls_back_to_the_host() -> None:
    def refuses(data: torch.Tensor, grey: bool, device: torch.device) -> torch.Tensor:
        raise RuntimeError("nvjpegDecode failed: NVJPEG_STATUS_BAD_JPEG")

    def wrong_shape(data: torch.Tensor, grey: bool, device: torch.device) -> torch.Tensor:
        return torch.zeros((3, 2, 2), dtype=torch.uint8)

    for decoder in (refuses, wrong_shape):
        assert nvjpeg.decode_on_device(_jpeg(), CPU, max_pixels=LIMIT, keep_metadata=False, decoder=decoder) is None


def test_not_available_without_cuda() -> None:
    assert nvjpeg.available(CPU) is False
