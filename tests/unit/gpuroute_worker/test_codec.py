"""Decoding and encoding keep what images carry, checked against Pillow: limits, alpha,
grey, 16-bit, ICC (Display P3), CMYK, MPO, EXIF/GPS, the decoder allowlist."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, features

from gpuroute_worker.codec import (
    DECODABLE_FORMATS,
    DecodeError,
    OutputOptions,
    _composite,
    decode_image,
    encode_image,
    output_options,
    to_tensor,
)
from tests.unit.gpuroute_worker.icc_testutil import display_p3, grey_profile

LIMITS = {"max_bytes": 1 << 24, "max_pixels": 1 << 24}
GPS_IFD = 0x8825
ORIENTATION = 0x0112


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _rng_image(mode: str, h: int = 12, w: int = 20, seed: int = 0) -> Image.Image:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


def _pixels(image: Image.Image) -> torch.Tensor:
    return to_tensor(np.asarray(image))


def _reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---------------------------------------------------------------------------- limits


def _png(w: int, h: int) -> bytes:
    return _save(Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)), "PNG")


def test_limits_are_enforced_before_decoding() -> None:
    with pytest.raises(DecodeError, match="pixels, limit is 9999"):
        decode_image(_png(100, 100), max_bytes=1 << 20, max_pixels=9999)
    with pytest.raises(DecodeError, match="bytes, limit is 10"):
        decode_image(_png(10, 10), max_bytes=10, max_pixels=1 << 20)
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", max_bytes=10, max_pixels=10)
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"junk" * 50, max_bytes=1 << 20, max_pixels=1 << 20)


def test_formats_outside_the_allowlist_are_not_probed() -> None:
    # Pillow reads PCX and TGA, but they are not on the list, so their plugins never see the bytes.
    for fmt in ("PCX", "TGA"):
        data = _save(_rng_image("RGB"), fmt)
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow would read it
        with pytest.raises(DecodeError, match="not an image in a supported format"):
            decode_image(data, **LIMITS)
    assert "PCX" not in DECODABLE_FORMATS and "JPEG" in DECODABLE_FORMATS


# ---------------------------------------------------------------------------- channels and depth


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_png_round_trip_keeps_channels_exactly(mode: str) -> None:
    image = _rng_image(mode)
    decoded = decode_image(_save(image, "PNG"), **LIMITS)
    assert decoded.channels == len(mode)
    assert torch.equal(decoded.pixels, _pixels(image))
    out = _reopen(encode_image(decoded.pixels, fmt="png", quality=90).data)
    assert out.mode == mode
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_palette_with_transparency_becomes_rgba() -> None:
    image = _rng_image("RGB").quantize(16)
    image.info["transparency"] = 0
    decoded = decode_image(_save(image, "PNG", transparency=0), **LIMITS)
    assert decoded.channels == 4
    assert np.array_equal(np.asarray(decoded.pixels.permute(1, 2, 0)), np.asarray(image.convert("RGBA")))


def test_grey_jpeg_stays_single_channel() -> None:
    data = _save(_rng_image("L"), "JPEG", quality=95)
    decoded = decode_image(data, **LIMITS)
    assert decoded.channels == 1
    assert _reopen(encode_image(decoded.pixels, fmt="jpeg", quality=90).data).mode == "L"


def test_sixteen_bit_grey_is_kept_for_png_and_scaled_for_jpeg() -> None:
    levels = (np.arange(12 * 20, dtype=np.uint32).reshape(12, 20) * 273).astype(np.uint16)
    decoded = decode_image(_save(Image.fromarray(levels), "PNG"), **LIMITS)
    assert decoded.pixels.dtype == torch.uint16
    assert np.array_equal(decoded.pixels[0].numpy(), levels)
    png = _reopen(encode_image(decoded.pixels, fmt="png", quality=90).data)
    assert png.mode == "I;16"
    assert np.array_equal(np.asarray(png), levels)
    # JPEG has 8 bits: v * 255 / 65535, rounded.
    pixels = to_tensor(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    jpeg = _reopen(encode_image(pixels, fmt="jpeg", quality=100).data)
    assert np.abs(np.asarray(jpeg).astype(int) - [[0, 1, 128, 255]]).max() <= 1


def test_composite_matches_pillow_alpha_composite() -> None:
    image = _rng_image("RGBA", seed=3)
    array = np.asarray(image)
    for background in ((255, 255, 255), (0, 128, 255)):
        ours = _composite(array, background)
        ref = Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image).convert("RGB")
        assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_jpeg_of_a_transparent_image_is_composited_onto_the_background() -> None:
    array = np.zeros((16, 16, 4), dtype=np.uint8)
    array[:, :8] = (200, 0, 0, 255)  # opaque red left half, fully transparent right half
    pixels = to_tensor(array)
    default = np.asarray(_reopen(encode_image(pixels, fmt="jpeg", quality=100).data)).astype(int)
    assert np.abs(default[8, 12] - [255, 255, 255]).max() <= 2  # white, not black
    assert np.abs(default[8, 2] - [200, 0, 0]).max() <= 3
    green = encode_image(pixels, fmt="jpeg", quality=100, options=OutputOptions(background=(0, 255, 0)))
    assert np.abs(np.asarray(_reopen(green.data)).astype(int)[8, 12] - [0, 255, 0]).max() <= 3


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_alpha_is_written_to_png_and_webp(fmt: str) -> None:
    image = _rng_image("RGBA")
    out = _reopen(encode_image(_pixels(image), fmt=fmt, quality=100).data)
    assert out.mode == "RGBA"


@pytest.mark.parametrize("fmt", ["webp", *(["avif"] if features.check("avif") else [])])
@pytest.mark.parametrize("form", ["tensor", "pillow"])
def test_grey_with_alpha_keeps_its_alpha_in_formats_without_grey(fmt: str, form: str) -> None:
    # WebP and AVIF store no grey: LA becomes RGBA, the grey in every colour band, alpha kept.
    image = _rng_image("LA", seed=11)
    image.putpixel((0, 0), (90, 0))
    raster = _pixels(image) if form == "tensor" else image
    encoded = encode_image(raster, fmt=fmt, quality=100)
    out = _reopen(encoded.data)
    assert out.mode == "RGBA"
    alpha = np.asarray(out)[:, :, 3].astype(int)
    expected = np.asarray(image)[:, :, 1].astype(int)
    assert np.abs(alpha - expected).max() <= (0 if fmt == "webp" else 8)  # WebP's alpha is lossless
    assert alpha[0, 0] <= 8


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a_profile_is_embedded_only_where_it_describes_the_channels(fmt: str) -> None:
    grey, colour = _rng_image("L", seed=12), _rng_image("RGB", seed=13)
    p3, grey_icc = display_p3(), grey_profile()
    for image, icc, embedded in ((colour, p3, True), (colour, grey_icc, False)):
        out = _reopen(encode_image(_pixels(image), fmt=fmt, quality=90, icc=icc).data)
        assert (out.info.get("icc_profile") == icc) is embedded, (image.mode, icc[16:20], fmt)
        assert embedded or "icc_profile" not in out.info
    # Grey: PNG and JPEG store it as grey, so only the grey profile fits; WebP expands it to RGB.
    fits_grey = fmt != "webp"
    for icc, embedded in ((grey_icc, fits_grey), (p3, not fits_grey)):
        out = _reopen(encode_image(_pixels(grey), fmt=fmt, quality=90, icc=icc).data)
        assert (out.info.get("icc_profile") == icc) is embedded, ("L", icc[16:20], fmt)
        assert embedded or "icc_profile" not in out.info


def test_encoder_ignores_a_profile_the_pillow_image_carries() -> None:
    # Pillow's PNG and AVIF writers fall back to image.info: only the encoder's own choice counts.
    image = _rng_image("L", seed=14)
    image.info["icc_profile"] = display_p3()
    for fmt in ("png", "webp", "jpeg"):
        assert "icc_profile" not in _reopen(encode_image(image, fmt=fmt, quality=90).data).info, fmt


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trip(fmt: str) -> None:
    pixels = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    encoded = encode_image(pixels, fmt=fmt, quality=95)
    assert (encoded.width, encoded.height, encoded.format) == (20, 12, fmt)
    decoded = decode_image(encoded.data, **LIMITS)
    if fmt == "png":
        assert torch.equal(decoded.pixels, pixels)
    assert len(encoded.sha256) == 64


# ---------------------------------------------------------------------------- colour


def test_display_p3_is_converted_to_srgb() -> None:
    p3 = display_p3()
    array = np.array([[[128, 128, 128], [100, 150, 50], [30, 200, 220], [250, 40, 90]]], dtype=np.uint8)
    image = Image.fromarray(np.repeat(array, 4, axis=0))
    decoded = decode_image(_save(image, "PNG", icc_profile=p3), **LIMITS)
    reference = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(p3)),
                                          ImageCms.createProfile("sRGB"))
    ours = decoded.pixels.permute(1, 2, 0).numpy()
    assert np.array_equal(ours, np.asarray(reference))
    assert decoded.icc is None
    assert np.abs(ours[0, 0].astype(int) - 128).max() <= 1        # neutral grey stays grey
    assert np.abs(ours[0, 1].astype(int) - array[0, 1]).max() > 5  # colours move into sRGB
    out = _reopen(encode_image(decoded.pixels, fmt="png", quality=90).data)
    assert "icc_profile" not in out.info  # sRGB, implied


def test_p3_rgba_keeps_its_alpha_through_conversion() -> None:
    image = _rng_image("RGBA", seed=7)
    decoded = decode_image(_save(image, "PNG", icc_profile=display_p3()), **LIMITS)
    assert decoded.channels == 4
    assert np.array_equal(decoded.pixels[3].numpy(), np.asarray(image)[:, :, 3])


def test_keep_metadata_carries_the_profile_instead() -> None:
    p3 = display_p3()
    image = _rng_image("RGB", seed=2)
    decoded = decode_image(_save(image, "JPEG", icc_profile=p3, quality=95), keep_metadata=True, **LIMITS)
    assert decoded.icc == p3
    assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), np.asarray(_reopen(_save(image, "JPEG", quality=95))))
    for fmt in ("png", "jpeg", "webp"):
        out = _reopen(encode_image(decoded.pixels, fmt=fmt, quality=90, icc=decoded.icc).data)
        assert out.info.get("icc_profile") == p3, fmt


def test_a_broken_profile_reads_the_pixels_as_srgb() -> None:
    image = _rng_image("RGB")
    decoded = decode_image(_save(image, "PNG", icc_profile=b"not a profile" * 20), **LIMITS)
    assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), np.asarray(image))


def test_cmyk_jpeg_is_converted_like_pillow() -> None:
    cmyk = Image.fromarray(np.random.default_rng(4).integers(0, 256, (12, 20, 4), dtype=np.uint8), mode="CMYK")
    data = _save(cmyk, "JPEG", quality=95)
    decoded = decode_image(data, **LIMITS)
    reference = _reopen(data).convert("RGB")
    assert decoded.channels == 3
    assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), np.asarray(reference))


# ---------------------------------------------------------------------------- formats


def test_mpo_reads_the_primary_image() -> None:
    first, second = _rng_image("RGB", seed=1), _rng_image("RGB", seed=2)
    data = _save(first, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data, **LIMITS)
    assert decoded.format == "MPO"
    expected = np.asarray(_reopen(_save(first, "JPEG", quality=95)))
    assert np.abs(decoded.pixels.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_input_and_output() -> None:
    image = _rng_image("RGBA", seed=5)
    decoded = decode_image(_save(image, "AVIF", quality=90), **LIMITS)
    assert decoded.format == "AVIF" and decoded.channels == 4
    out = encode_image(decoded.pixels, fmt="avif", quality=80)
    assert _reopen(out.data).format == "AVIF"


# ---------------------------------------------------------------------------- metadata


def _photo_with_gps() -> bytes:
    image = _rng_image("RGB", h=10, w=30)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90 degrees clockwise on display
    exif[0x010F] = "gpuroute test camera"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 0.0)})
    return _save(image, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(_photo_with_gps(), **LIMITS)
    assert tuple(decoded.pixels.shape) == (3, 30, 10)


def test_exif_and_gps_are_stripped_by_default() -> None:
    decoded = decode_image(_photo_with_gps(), **LIMITS)
    assert decoded.exif is None
    for fmt in ("jpeg", "png", "webp"):
        out = _reopen(encode_image(decoded.pixels, fmt=fmt, quality=90, exif=decoded.exif).data)
        assert "exif" not in out.info and len(out.getexif()) == 0, fmt


def test_keep_metadata_keeps_exif_with_orientation_normalised() -> None:
    decoded = decode_image(_photo_with_gps(), keep_metadata=True, **LIMITS)
    assert tuple(decoded.pixels.shape) == (3, 30, 10)
    out = _reopen(encode_image(decoded.pixels, fmt="jpeg", quality=90, exif=decoded.exif).data)
    exif = out.getexif()
    assert ORIENTATION not in exif  # the pixels are upright already
    assert exif[0x010F] == "gpuroute test camera"
    assert exif.get_ifd(GPS_IFD)[1] == "N"


def test_output_options_parse_the_job_message() -> None:
    assert output_options({}) == OutputOptions()
    parsed = output_options({"format": "jpeg", "quality": 80, "background": "#102030", "keepMetadata": True})
    assert parsed == OutputOptions("jpeg", 80, (16, 32, 48), True)
    with pytest.raises(DecodeError, match="spec.output.background"):
        output_options({"background": "white"})


# ---------------------------------------------------------------------------- HEIC


def test_heic_input_is_read_through_pillow_heif() -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    assert "HEIF" in DECODABLE_FORMATS
    # Encoded here by pillow-heif (libheif + x265): a smooth gradient survives HEVC well.
    yy, xx = np.mgrid[0:48, 0:64]
    array = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    heif = pillow_heif.from_pillow(Image.fromarray(array))
    buffer = io.BytesIO()
    heif.save(buffer, quality=95)
    decoded = decode_image(buffer.getvalue(), **LIMITS)
    assert decoded.format == "HEIF" and decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    error = np.abs(np.asarray(decoded.image).astype(int) - array.astype(int))
    assert error.mean() < 3.0, f"mean error {error.mean():.2f} levels"
    # And through the encoder like any other input.
    assert _reopen(encode_image(decoded.image, fmt="png", quality=90).data).size == (64, 48)
