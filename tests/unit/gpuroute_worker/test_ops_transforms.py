"""Transforms against Pillow (crop, transpose, rotate) and numpy.pad.

Bounds and measured values on these crops:
- crop, flip, pad (constant / edge / reflect): exact.
- rotate by multiples of 90 degrees (both filters, expand or not): exact.
- rotate by other angles, nearest: exact (Pillow's 16.16 fixed point reproduced).
- rotate by other angles, bilinear: Pillow truncates to 8 bits, we keep float:
  measured 51.0 to 54.6 dB over the whole image and the interior; asserted >= 48 dB
  on both. Output sizes with expand equal Pillow's.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gpuroute_worker.ops import transforms
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_equal, assert_psnr, photo, pil, to_tensor, to_uint8

FILL = "#102030"
FILL_RGB = (16, 32, 48)
PIL_ROTATE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
BILINEAR_BOUND_DB = 48.0


@pytest.mark.parametrize("name", IMAGES)
def test_crop_is_exact(name: str) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(transforms.crop(to_tensor(image), 7, 11, 50, 31))
    assert_equal(ours, np.asarray(pil(image).crop((7, 11, 57, 42))), "crop")


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_flip_is_exact(direction: str) -> None:
    image = photo("chelsea", *IMAGES["chelsea"])
    method = Image.Transpose.FLIP_LEFT_RIGHT if direction == "horizontal" else Image.Transpose.FLIP_TOP_BOTTOM
    ours = to_uint8(transforms.flip(to_tensor(image), direction))
    assert_equal(ours, np.asarray(pil(image).transpose(method)), f"flip {direction}")


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
@pytest.mark.parametrize(("left", "top", "right", "bottom"), [(3, 0, 5, 2), (0, 40, 150, 1)])
def test_pad_matches_numpy(mode: str, left: int, top: int, right: int, bottom: int) -> None:
    # The second border is wider than the 31x20 image: reflect keeps mirroring.
    image = photo("astronaut", 20, 31)
    ours = to_uint8(transforms.pad(to_tensor(image), left, top, right, bottom, mode, FILL))
    widths = ((top, bottom), (left, right), (0, 0))
    if mode == "constant":
        ref = np.stack(
            [np.pad(image[..., c], widths[:2], mode="constant", constant_values=FILL_RGB[c]) for c in range(3)], axis=-1
        )
    else:
        ref = np.pad(image, widths, mode=mode)
    assert_equal(ours, ref, f"pad {mode} {(left, top, right, bottom)}")


def test_pad_single_pixel_reflect_repeats_it() -> None:
    image = np.full((1, 1, 3), 77, dtype=np.uint8)
    ours = to_uint8(transforms.pad(to_tensor(image), 2, 1, 2, 1, "reflect", FILL))
    assert_equal(ours, np.pad(image, ((1, 1), (2, 2), (0, 0)), mode="reflect"), "reflect 1x1")


def _rotate_both(image: np.ndarray, angle: float, expand: bool, method: str) -> tuple[np.ndarray, np.ndarray]:
    ours = to_uint8(transforms.rotate(to_tensor(image), angle, expand, method, FILL))
    ref = np.asarray(pil(image).rotate(angle, PIL_ROTATE[method], expand=expand, fillcolor=FILL_RGB))
    return ours, ref


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("angle", [90, -90, 180, 270, 360, -180])
@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_right_angle_rotations_are_exact(name: str, angle: float, expand: bool, method: str) -> None:
    # Non-square 90-degree turns without expand go through Pillow's affine path.
    image = photo(name, *IMAGES[name])
    ours, ref = _rotate_both(image, angle, expand, method)
    assert_equal(ours, ref, f"rotate {angle} expand={expand} {method} on {name}")


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("angle", [30.0, -45.5, 123.0, 90.0001])
@pytest.mark.parametrize("expand", [False, True])
def test_rotate_nearest_is_exact(name: str, angle: float, expand: bool) -> None:
    image = photo(name, *IMAGES[name])
    ours, ref = _rotate_both(image, angle, expand, "nearest")
    assert_equal(ours, ref, f"rotate {angle} expand={expand} nearest on {name}")


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("angle", [30.0, -45.5, 123.0, 90.0001])
@pytest.mark.parametrize("expand", [False, True])
def test_rotate_bilinear_matches_pillow(name: str, angle: float, expand: bool) -> None:
    image = photo(name, *IMAGES[name])
    ours, ref = _rotate_both(image, angle, expand, "bilinear")
    assert ours.shape == ref.shape, f"rotate {angle} expand={expand}: shape {ours.shape} != Pillow {ref.shape}"
    what = f"rotate {angle} expand={expand} bilinear on {name}"
    assert_psnr(ours, ref, BILINEAR_BOUND_DB, what)
    assert_psnr(ours[2:-2, 2:-2], ref[2:-2, 2:-2], BILINEAR_BOUND_DB, what + " (interior)")


def test_rotate_plan_sizes_match_pillow() -> None:
    for h, w in [(96, 128), (97, 131), (1, 300), (5, 5)]:
        for angle in (0.0, 1.0, 45.0, 90.0, 135.5, 270.0, -33.3):
            plan = transforms.rotate_plan(h, w, angle, True)
            ref = Image.new("RGB", (w, h)).rotate(angle, expand=True)
            assert (plan.width, plan.height) == ref.size, (h, w, angle)
