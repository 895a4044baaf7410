"""Decode inputs and encode outputs, keeping what images carry. Runs on worker threads,
never on the GPU executor's thread.

What an image keeps (README, "Image fidelity"):
- Channels: grey stays one channel (L), grey with alpha two (LA), colour three (RGB),
  colour with alpha four (RGBA). Palette images become RGB, or RGBA when they have a
  transparent entry; 1-bit images become L.
- Depth: 16-bit greyscale (PNG, TIFF) stays 16-bit through the pipeline and is written
  as 16-bit PNG; JPEG, WebP and AVIF get it scaled to 8 bits with rounding. Pillow reads
  16-bit colour PNGs at 8 bits per channel (their high byte), so those are 8-bit here.
- Colour: an embedded ICC profile is converted to sRGB with littleCMS (Pillow's ImageCms)
  before anything else; CMYK (JPEG, TIFF) is converted to sRGB through its profile, or
  Pillow's plain conversion when it has none. With `keep_metadata` an RGB or grey
  profile is carried instead: the pixels stay in that space and the output embeds it.
  Profiles of grey images are carried or dropped, never converted (sRGB has no grey twin).
- Metadata: EXIF orientation is applied to the pixels. EXIF (GPS included), XMP and text
  chunks are dropped unless `keep_metadata`, which writes the EXIF back with the
  orientation tag removed (the pixels are already upright) and the ICC profile.
- Alpha: written to PNG, WebP and AVIF; JPEG has none, so the image is composited onto
  the output's background colour (white unless the job says otherwise).

Decoders: only the formats in DECODABLE_FORMATS are tried (Image.open(..., formats=)),
so Pillow never probes the bytes with its other, less-exercised plugins. HEIC/HEIF
(iPhone photos) is read through pillow-heif when it is installed (the worker extra).

Pixels: decoding yields a Pillow image, and the CPU path and the encoder work on it
directly; a tensor is made only for the steps and devices that need one (Decoded.pixels,
as_tensor), because each conversion costs about as much as a cheap op (about 1 ms/Mpix).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from gpuroute.ops_catalog import parse_color

log = logging.getLogger(__name__)


def _register_heif() -> bool:
    """Register pillow-heif's HEIF plugin with Pillow; False when it is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    # AVIF stays with Pillow's own plugin (libavif) when that is built in.
    register_heif_opener()
    return True


HEIF = _register_heif()
"""Whether HEIC/HEIF input can be read (pillow-heif installed)."""

DECODABLE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF",
                                      *(("AVIF",) if features.check("avif") else ()),
                                      *(("HEIF",) if HEIF else ()))
"""Pillow plugins allowed to read input bytes, in the order they are tried. The JPEG
plugin also reads MPO (multi-picture JPEG from phone cameras): its first image is used;
HEIF (pillow-heif) reads the primary image of a HEIC/HEIF file."""

Raster = torch.Tensor | Image.Image
"""An image between decoding and encoding: a Pillow image (L, LA, RGB, RGBA or I;16) or
a (C, H, W) uint8 tensor (uint16 for 16-bit grey)."""
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
ENCODABLE_FORMATS = frozenset(f for f in _PIL_FORMAT if f != "avif" or features.check("avif"))
"""Output formats this worker's Pillow can write."""

MODES = ("L", "LA", "RGB", "RGBA")
"""Pillow mode by channel count - 1."""
_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_ICC_SPACE = {b"RGB ": 3, b"GRAY": 1}
"""ICC profile colour space (header bytes 16:20) -> colour channels it describes."""


class DecodeError(ValueError):
    """The input is not an image this worker accepts; the job's fault, never retried."""


@dataclass(frozen=True)
class Encoded:
    """An encoded output image."""

    data: bytes
    """The file's bytes."""
    width: int
    """Width in pixels."""
    height: int
    """Height in pixels."""
    sha256: str
    """Hex digest of `data`."""
    format: str
    """png, jpeg, webp or avif."""


@dataclass(frozen=True)
class Decoded:
    """A decoded input: the image plus what the output may carry."""

    image: Image.Image
    """Loaded, upright, in mode L, LA, RGB, RGBA or I;16 (16-bit grey)."""
    icc: bytes | None = None
    """Profile the pixels are in, carried to the output (keep_metadata only); None means sRGB."""
    exif: bytes | None = None
    """EXIF to write back, orientation removed (keep_metadata only)."""
    format: str = ""
    """Pillow's name for the input format (PNG, JPEG, MPO, ...)."""

    @functools.cached_property
    def pixels(self) -> torch.Tensor:
        """(C, H, W) uint8, or uint16 for 16-bit grey; C is 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA),
        channels-last. Made on first use (one copy): only the GPU path and torch steps need it."""
        return from_pil(self.image)

    @property
    def channels(self) -> int:
        return shape_of(self.image)[0]

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width


@dataclass(frozen=True)
class OutputOptions:
    """How a job wants its result written."""

    format: str = "png"
    """png, jpeg, webp or avif."""
    quality: int = 90
    """Encoder quality for jpeg, webp and avif."""
    background: tuple[int, int, int] = (255, 255, 255)
    """Colour transparent pixels are composited onto for JPEG."""
    keep_metadata: bool = False
    """Carry EXIF (orientation normalised) and the ICC profile instead of dropping them."""


def output_options(output: Mapping[str, Any]) -> OutputOptions:
    """The JOB message's `output` map -> OutputOptions (defaults for absent keys)."""
    background = output.get("background") or "#ffffff"
    if not isinstance(background, str) or not _HEX_COLOR.match(background):
        raise DecodeError(f"spec.output.background: must be a colour as #rrggbb, got {background!r}")
    return OutputOptions(format=str(output.get("format", "png")), quality=int(output.get("quality", 90)),
                         background=parse_color(background), keep_metadata=bool(output.get("keepMetadata", False)))


# ---------------------------------------------------------------------------- tensors


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) array -> (C, H, W) tensor sharing its memory (channels-last)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


def to_array(pixels: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) contiguous array (no copy when already channels-last)."""
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 or uint16 (C = 1) tensor -> Pillow image in L, LA, RGB, RGBA or I;16."""
    array = to_array(pixels)
    if array.dtype == np.uint16 and array.shape[2] != 1:
        raise ValueError("16-bit images must be single-channel")
    # fromarray infers L, LA, RGB, RGBA and I;16 from the shape and dtype.
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def from_pil(image: Image.Image) -> torch.Tensor:
    """Pillow image in L, LA, RGB, RGBA or I;16 -> (C, H, W) tensor."""
    if image.mode in ("I;16", "I;16L", "I;16B"):
        return to_tensor(np.asarray(image).astype(np.uint16, copy=False))
    if image.mode not in MODES:
        raise ValueError(f"unexpected mode {image.mode}")
    return to_tensor(np.asarray(image))


def shape_of(raster: Raster) -> tuple[int, int, int]:
    """(C, H, W) of a tensor or Pillow image, without converting it."""
    if isinstance(raster, Image.Image):
        channels = 1 if raster.mode.startswith("I;16") else len(raster.getbands())
        return channels, raster.height, raster.width
    return int(raster.shape[0]), int(raster.shape[1]), int(raster.shape[2])


def as_tensor(raster: Raster) -> torch.Tensor:
    """A Raster as a (C, H, W) tensor (a copy for a Pillow image, else itself)."""
    return from_pil(raster) if isinstance(raster, Image.Image) else raster


def as_image(raster: Raster) -> Image.Image:
    """A Raster as a Pillow image (a copy for a tensor, else itself)."""
    return raster if isinstance(raster, Image.Image) else to_pil(raster)


# ---------------------------------------------------------------------------- colour


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=16)
def _to_srgb_transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform:
    # Building a transform parses the profile and precomputes tables: a few ms, so phone
    # photos (which share a handful of profiles) build theirs once per worker.
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(source, _SRGB, in_mode, out_mode,
                                   renderingIntent=ImageCms.Intent.PERCEPTUAL)


def _icc_channels(icc: bytes) -> int | None:
    return _ICC_SPACE.get(icc[16:20]) if len(icc) >= 20 else None


def _convert_to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB, RGBA or CMYK in the space `icc` describes -> sRGB RGB or RGBA."""
    out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
    if icc:
        try:
            converted = ImageCms.applyTransform(image, _to_srgb_transform(icc, image.mode, out_mode))
            if converted is not None:  # None only when asked to convert in place
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            # A broken or mismatched profile is the input's problem, but the pixels are
            # still an image: read them as sRGB, as a browser would.
            log.warning("ignoring an unusable ICC profile (%s); reading the pixels as sRGB", exc)
    return image if image.mode == out_mode else image.convert(out_mode)


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> L, LA, RGB, RGBA or I;16 (CMYK handled before)."""
    mode = image.mode
    if mode in MODES or mode == "I;16":
        return image
    if mode in ("I;16L", "I;16B", "I;16N"):
        return Image.fromarray(np.asarray(image).astype(np.uint16), mode="I;16")
    if mode == "I":
        # 32-bit integer images are how some readers hand over 16-bit grey.
        return Image.fromarray(np.clip(np.asarray(image), 0, 65535).astype(np.uint16), mode="I;16")
    if mode == "1":
        return image.convert("L")
    if mode in ("La",):
        return image.convert("LA")
    if mode in ("RGBa", "PA"):
        return image.convert("RGBA")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode == "F":
        # Float images have no agreed range; Pillow's conversion clips to 0..255.
        return image.convert("L")
    return image.convert("RGB")  # YCbCr, LAB, HSV, RGBX


# ---------------------------------------------------------------------------- decode


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, keep_metadata: bool = False) -> Decoded:
    """Encoded bytes -> Decoded, upright, in sRGB unless `keep_metadata` carries the profile."""
    if len(data) > max_bytes:
        raise DecodeError(f"input is {len(data)} bytes, limit is {max_bytes}")
    if not data:
        raise DecodeError("input is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and errors above 2x) on huge images; our own limit applies first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image: Image.Image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
            except UnidentifiedImageError as exc:
                raise DecodeError("input is not an image in a supported format "
                                  f"({', '.join(f.lower() for f in DECODABLE_FORMATS)})") from exc
            source_format = str(image.format)
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(f"input is {width}x{height} = {width * height} pixels, limit is {max_pixels}")
            icc = image.info.get("icc_profile") or None
            image = ImageOps.exif_transpose(image)
            exif = None
            if keep_metadata:
                tags = image.getexif()
                tags.pop(0x0112, None)  # the pixels are upright now
                exif = tags.tobytes() if len(tags) else None
            if image.mode in ("CMYK", "RGB", "RGBA") and icc and (image.mode == "CMYK" or not keep_metadata):
                image = _convert_to_srgb(image, icc)
                icc = None
            elif image.mode == "CMYK":
                image = image.convert("RGB")
            image = _normalise_mode(image)
            channels = shape_of(image)[0]
            if icc is not None and (not keep_metadata or _icc_channels(icc) != (1 if channels <= 2 else 3)):
                icc = None  # sRGB now, or a profile that no longer describes these pixels
            # `icc` alone says what the pixels are in: the image's own copy (the input's
            # profile, or littleCMS's sRGB after a conversion) would ride along with every
            # Pillow step and into writers that read image.info.
            image.info.pop("icc_profile", None)
            # Read every byte here, on the decode thread: a lazily loaded image would
            # decode (and fail) inside the executor instead.
            image.load()
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"input is not a readable image: {exc}") from exc
    return Decoded(image, icc=icc, exif=exif, format=source_format)


# ---------------------------------------------------------------------------- encode


def _to_8bit(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    # v * 255 / 65535, rounded: 65535 -> 255, 32768 -> 128.
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _composite(array: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 2 or 4) with straight alpha -> (H, W, 1 or 3) over an opaque background."""
    colour = array[:, :, :-1].astype(np.uint32)
    alpha = array[:, :, -1:].astype(np.uint32)
    grey_background = background[0] == background[1] == background[2]
    if colour.shape[2] == 1 and not grey_background:
        colour = np.repeat(colour, 3, axis=2)
    bg = np.array(background[:1] if colour.shape[2] == 1 else background, dtype=np.uint32)
    # Rounded integer blend, as Pillow's alpha_composite does.
    out = (colour * alpha + bg * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _writable(raster: Raster, fmt: str, options: OutputOptions) -> Image.Image:
    """The Pillow image `fmt` can store: as it is when the format takes its mode, else
    reduced to 8 bits, composited onto the background or expanded from grey."""
    channels, _, _ = shape_of(raster)
    sixteen = raster.mode.startswith("I;16") if isinstance(raster, Image.Image) else raster.dtype == torch.uint16
    needs_change = ((sixteen and fmt != "png") or (fmt == "jpeg" and channels in (2, 4))
                    or (fmt in ("webp", "avif") and channels in (1, 2)))
    if not needs_change:
        # The common case: the image the last step produced is saved as it is.
        return as_image(raster)
    array = to_array(as_tensor(raster))
    if array.dtype == np.uint16 and fmt != "png":
        array = _to_8bit(array)
    if fmt == "jpeg" and array.shape[2] in (2, 4):
        array = _composite(array, options.background)
    if fmt in ("webp", "avif") and array.shape[2] in (1, 2):
        # Neither format stores grey: expand as Pillow would when converting.
        array = np.concatenate([np.repeat(array[:, :, :1], 3, axis=2), array[:, :, 1:]], axis=2)
    return to_pil(torch.from_numpy(array).permute(2, 0, 1))


def _colour_channels(mode: str) -> int:
    """Colour channels (alpha aside) a profile must describe for an image in `mode`."""
    return 1 if mode in ("L", "LA", "I;16") else 3


def encode_image(pixels: Raster, *, fmt: str, quality: int, options: OutputOptions | None = None,
                 icc: bytes | None = None, exif: bytes | None = None) -> Encoded:
    """A Pillow image or (C, H, W) uint8 (or 16-bit grey) tensor to PNG, JPEG, WebP or AVIF bytes."""
    options = options or OutputOptions(format=fmt, quality=quality)
    if fmt not in ENCODABLE_FORMATS:
        raise ValueError(f"output format {fmt!r} is not supported by this worker")
    image = _writable(pixels, fmt, options)
    buffer = io.BytesIO()
    save: dict[str, object] = {}
    if fmt in ("jpeg", "webp", "avif"):
        save["quality"] = quality
    else:
        # Level 1 is ~3x faster than Pillow's default 6 for a few percent more bytes.
        save["compress_level"] = 1
    # Always say which profile, None included: Pillow's PNG and AVIF writers otherwise fall
    # back to image.info, where the decoder's image (and every Pillow step's copy of its
    # info) still holds the input's profile, or littleCMS's sRGB after a conversion.
    save["icc_profile"] = icc if icc is not None and _icc_channels(icc) == _colour_channels(image.mode) else None
    if exif:
        save["exif"] = exif
    image.save(buffer, format=_PIL_FORMAT[fmt], **save)
    data = buffer.getvalue()
    return Encoded(data, image.width, image.height, hashlib.sha256(data).hexdigest(), fmt)
