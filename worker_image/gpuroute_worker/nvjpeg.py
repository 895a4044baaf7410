"""JPEG decoding on the GPU with nvJPEG (torchvision.io.decode_jpeg on a CUDA device).

A JPEG decoded on the host crosses the bus as raw pixels (3 bytes a pixel); decoded on the
device, only the compressed file does (about a tenth of that), and the CPU threads that
libjpeg-turbo would keep busy stay free for transfers and encoding.

Only JPEGs whose decoding cannot differ from the Pillow path in anything but IDCT rounding
take it: baseline or progressive YCbCr or grey, 8 bits, one frame, no ICC profile (a
profile needs littleCMS, on the host). Everything else (CMYK, MPO, a P3 profile, a file
nvJPEG refuses) goes through codec.decode_image as before, so fidelity rules live in one
place. EXIF orientation is read from the header and applied on the device, exactly as
ImageOps.exif_transpose does on the host, and kept EXIF loses its orientation tag the same
way.

torchvision is optional: the worker image installs the build that matches its CUDA torch
(Dockerfile.worker); without it, or without CUDA, `available()` is False and nothing here
runs. The header probe and the orientation are plain torch and Pillow, tested on the CPU;
the decode itself has a gpu-marked test against Pillow.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112
_DEVICE_DECODE = threading.Lock()


@dataclass(frozen=True)
class JpegHeader:
    """What the nvJPEG path needs to know before decoding, from Pillow's header parse only."""

    width: int
    """Stored width (before orientation)."""
    height: int
    """Stored height (before orientation)."""
    grey: bool
    """One channel (mode L) rather than YCbCr -> RGB."""
    orientation: int
    """EXIF orientation, 1 (upright) to 8."""
    exif: bytes | None
    """EXIF to carry to the output without its orientation tag (keep_metadata only)."""


@dataclass(frozen=True)
class DeviceDecoded:
    """A JPEG decoded on the device: the subset of codec.Decoded the job runner reads."""

    pixels: torch.Tensor
    """(C, H, W) uint8 on the device, upright; C is 1 or 3."""
    exif: bytes | None = None
    """As codec.Decoded.exif."""
    icc: bytes | None = None
    """Always None: JPEGs with a profile are decoded on the host."""
    format: str = "JPEG"

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])


def probe(data: bytes, *, max_pixels: int, keep_metadata: bool) -> JpegHeader | None:
    """The header of a JPEG the device can decode as Pillow would, or None (then the host decodes)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            # MPO opens as JPEG's subclass with several frames: the host path picks the first.
            if image.format != "JPEG" or getattr(image, "n_frames", 1) != 1:
                return None
            if image.mode not in ("RGB", "L") or image.info.get("icc_profile"):
                return None
            width, height = image.size
            if width * height > max_pixels:
                return None  # the host path refuses it with the message users see
            tags = image.getexif()
            orientation = int(tags.get(ORIENTATION_TAG, 1) or 1)
            exif = None
            if keep_metadata:
                tags.pop(ORIENTATION_TAG, None)
                exif = tags.tobytes() if len(tags) else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError):
        return None  # the host decoder reports what is wrong with it
    return JpegHeader(width, height, image.mode == "L", orientation if 1 <= orientation <= 8 else 1, exif)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, as ImageOps.exif_transpose turns a Pillow image."""
    h, w = 1, 2
    if orientation == 2:
        return pixels.flip(w)
    if orientation == 3:
        return pixels.flip(h, w)
    if orientation == 4:
        return pixels.flip(h)
    if orientation == 5:  # Image.TRANSPOSE: the main diagonal
        return pixels.transpose(h, w)
    if orientation == 6:  # Image.ROTATE_270: a quarter turn clockwise
        return pixels.rot90(-1, (h, w))
    if orientation == 7:  # Image.TRANSVERSE: the anti-diagonal
        return pixels.transpose(h, w).flip(h, w)
    if orientation == 8:  # Image.ROTATE_90: a quarter turn counter-clockwise
        return pixels.rot90(1, (h, w))
    return pixels


Decoder = Callable[[torch.Tensor, bool, torch.device], torch.Tensor]
"""(file bytes as a uint8 tensor, grey, device) -> (C, H, W) uint8 on the device."""


@functools.lru_cache(maxsize=1)
def _torchvision_decoder() -> Decoder | None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError) as exc:  # a torchvision built for another torch fails at import
        log.info("nvJPEG decoding off: torchvision is not usable (%s)", exc)
        return None

    def decode(data: torch.Tensor, grey: bool, device: torch.device) -> torch.Tensor:
        mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
        # torchvision's CUDA decoder runs nvJPEG on a private stream without waiting for the
        # caller's: it can be handed a block that kernels queued elsewhere still read
        # (pytorch/vision#9606), and calls from several threads have corrupted images
        # (pytorch/vision#8587). So one decode at a time, with the device idle before it
        # and the pixels complete after it: the executor thread then reads finished data.
        with _DEVICE_DECODE:
            torch.cuda.synchronize(device)
            pixels = decode_jpeg(data, mode=mode, device=device)
            torch.cuda.synchronize(device)
        return pixels

    return decode


def available(device: torch.device) -> bool:
    """nvJPEG can run here: a CUDA device and a torchvision that works with this torch."""
    return device.type == "cuda" and _torchvision_decoder() is not None


def decode_on_device(data: bytes, device: torch.device, *, max_pixels: int, keep_metadata: bool,
                     decoder: Decoder | None = None) -> DeviceDecoded | None:
    """`data` decoded on `device`, upright; None when the host must decode it (not eligible,
    or refused by the device decoder: the host decoder then names the problem)."""
    header = probe(data, max_pixels=max_pixels, keep_metadata=keep_metadata)
    decode = decoder or _torchvision_decoder()
    if header is None or decode is None:
        return None
    try:
        stored = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), header.grey, device)
    except RuntimeError as exc:
        log.info("nvJPEG refused a JPEG (%s); decoding it on the host", exc)
        return None
    if tuple(stored.shape) != (1 if header.grey else 3, header.height, header.width):
        log.warning("nvJPEG decoded %s for a %dx%d JPEG; decoding it on the host", tuple(stored.shape),
                    header.width, header.height)
        return None
    return DeviceDecoded(orient(stored, header.orientation).contiguous(), exif=header.exif)
