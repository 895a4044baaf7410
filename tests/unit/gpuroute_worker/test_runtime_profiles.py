"""What a job's output file carries, through the worker's real CPU path (download, decode,
Pillow steps, encode, upload): the profile embedded is the one the job kept and only where
it describes the output's channels; nothing the decoder's Pillow image carried leaks out."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute.protocol import Kind
from tests.unit.gpuroute_worker.icc_testutil import display_p3
from tests.unit.gpuroute_worker.runtime_testutil import run_jobs, storage


def _p3_png() -> bytes:
    array = np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", icc_profile=display_p3())
    return buffer.getvalue()


def _output(steps: list[dict[str, Any]], fmt: str, *, keep: bool) -> Image.Image:
    with storage({"/in/p3.png": _p3_png()}) as store:
        header = {"job": "j/1", "steps": steps, "timeoutS": 30.0, "input": {"url": f"{store.url}/in/p3.png"},
                  "output": {"url": f"{store.url}/out/o", "format": fmt, "keepMetadata": keep}}
        sent = run_jobs(header)
        data = store.objects.get("/out/o")
    assert [kind for kind, _ in sent] == [Kind.ACCEPTED, Kind.RESULT], sent
    assert data is not None
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
@pytest.mark.parametrize("op", ["invert", "blur", "grayscale"])
def test_without_keep_metadata_no_profile_is_embedded(op: str, fmt: str) -> None:
    # The decoder converted the P3 pixels to sRGB: the output is sRGB, which needs no profile.
    out = _output([{"op": op}], fmt, keep=False)
    assert "icc_profile" not in out.info, (op, fmt, out.info.get("icc_profile", b"")[:40])


def test_keep_metadata_grayscale_drops_the_rgb_profile_from_a_grey_png() -> None:
    out = _output([{"op": "grayscale"}], "png", keep=True)
    assert out.mode == "L"
    assert "icc_profile" not in out.info  # an RGB profile cannot describe one grey channel


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_keep_metadata_carries_the_p3_profile_on_colour_output(fmt: str) -> None:
    out = _output([{"op": "invert"}], fmt, keep=True)
    assert out.mode == "RGB" and out.info.get("icc_profile") == display_p3()
