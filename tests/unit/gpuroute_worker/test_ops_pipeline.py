"""run_pipeline and output_shape: composition, batch invariance, validation, deadlines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gpuroute.ops_catalog import MAX_DIMENSION, normalize_steps
from gpuroute_worker.ops import OpError, OutOfMemory, enhance, output_shape, run_pipeline
from gpuroute_worker.sr.registry import ModelRegistry, ModelSource
from gpuroute_worker.sr.srvgg import SRVGGNetCompact
from tests.unit.gpuroute_worker.ops_testutil import assert_equal, photo, pil, to_tensor, to_uint8


class _FixedRegistry(ModelRegistry):
    """Serves in-memory modules by name, without files (the file path is tested in test_sr_models)."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], scales: Mapping[str, int]) -> None:
        super().__init__({name: ModelSource(f"memory:{name}", "0" * 64) for name in modules})
        self._fixed = dict(modules)
        self._fixed_scales = dict(scales)

    def scale(self, name: str) -> int:
        self._source(name)
        return self._fixed_scales[name]

    def load(self, name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        self._source(name)
        return self._fixed[name]


def _batch(*names: str, h: int = 45, w: int = 61) -> torch.Tensor:
    return torch.cat([to_tensor(photo(n, h, w)) for n in names])


def _steps(*steps: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    # Normalized one by one: EVERY_OP is longer than a spec may be and is run in slices.
    return tuple(normalize_steps([step])[0] for step in steps)


EVERY_OP = _steps(
    {"op": "autocontrast", "cutoff": 1.5},
    {"op": "equalize"},
    {"op": "contrast", "factor": 1.3},
    {"op": "saturation", "factor": 0.7},
    {"op": "brightness", "factor": 1.1},
    {"op": "gamma", "gamma": 1.4},
    {"op": "resize", "width": 50, "method": "lanczos"},
    {"op": "sharpen"},
    {"op": "denoise", "size": 3},
    {"op": "denoise", "method": "gaussian", "radius": 0.8},
    {"op": "blur", "radius": 1.2},
    {"op": "rotate", "angle": 17, "expand": True, "fill": "#ff8000"},
    {"op": "pad", "left": 3, "bottom": 4, "mode": "reflect"},
    {"op": "crop", "x": 2, "y": 3, "width": 40, "height": 30},
    {"op": "flip", "direction": "vertical"},
    {"op": "sepia", "amount": 0.5},
    {"op": "edges"},
    {"op": "emboss"},
    {"op": "grayscale"},
    {"op": "invert"},
    {"op": "upscale", "scale": 1.5, "method": "bilinear"},
)


def test_batch_results_do_not_depend_on_batch_mates() -> None:
    # Histogram ops and the contrast mean must be per image, not per batch.
    names = ("astronaut", "chelsea", "coffee")
    batch = _batch(*names)
    for start in range(0, len(EVERY_OP), 16):
        steps = EVERY_OP[start : start + 16]
        together = run_pipeline(batch, steps)
        for i in range(len(names)):
            alone = run_pipeline(batch[i : i + 1], steps)
            torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-6)


def test_every_op_runs_and_shape_is_predicted() -> None:
    x = _batch("astronaut", h=37, w=53)
    for index in range(len(EVERY_OP)):
        steps = EVERY_OP[: index + 1]
        out = run_pipeline(x, steps)
        assert out.shape[-2:] == output_shape(37, 53, steps), steps[-1]
        assert out.dtype == torch.float32 and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_composition_matches_pillow_chain() -> None:
    image = photo("chelsea", 45, 61)
    steps = _steps(
        {"op": "flip"},
        {"op": "crop", "x": 5, "y": 4, "width": 50, "height": 33},
        {"op": "autocontrast", "cutoff": 1},
        {"op": "invert"},
        {"op": "rotate", "angle": 90, "expand": True},
        {"op": "resize", "width": 66, "height": 100, "method": "nearest"},
        {"op": "pad", "left": 2, "top": 1, "right": 3, "mode": "edge"},
    )
    ours = to_uint8(run_pipeline(to_tensor(image), steps))
    ref = pil(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((5, 4, 55, 37))
    ref = ImageOps.invert(ImageOps.autocontrast(ref, cutoff=1)).rotate(90, expand=True)
    ref = np.pad(np.asarray(ref.resize((66, 100), Image.Resampling.NEAREST)), ((1, 0), (2, 3), (0, 0)), mode="edge")
    assert_equal(ours, ref, "flip, crop, autocontrast, invert, rotate 90, nearest resize, edge pad")


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([{"op": "blur"}, {"op": "crop", "x": 61, "width": 1, "height": 1}], "spec.steps[1].x"),
        ([{"op": "crop", "y": 45, "width": 1, "height": 1}], "spec.steps[0].y"),
        ([{"op": "crop", "x": 10, "width": 52, "height": 1}], "spec.steps[0].width"),
        ([{"op": "crop", "y": 40, "width": 2, "height": 6}], "spec.steps[0].height"),
        ([{"op": "upscale", "scale": 16}, {"op": "upscale", "scale": 16}, {"op": "resize", "scale": 1.1}], "spec.steps[2].scale"),
        ([{"op": "resize", "height": MAX_DIMENSION, "method": "nearest"}], "spec.steps[0].height"),
        ([{"op": "resize", "width": 16000}, {"op": "pad", "right": 400, "left": 10}], "spec.steps[1].right"),
        ([{"op": "upscale", "method": "model", "model": "nope"}], "spec.steps[0].model"),
    ],
)
def test_input_faults_raise_op_error_naming_the_field(steps: Sequence[Mapping[str, Any]], field: str) -> None:
    registry = _FixedRegistry({}, {})
    normalized = normalize_steps(list(steps))
    with pytest.raises(OpError) as info:
        output_shape(45, 61, normalized, models=registry)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    # run_pipeline validates every step before computing anything.
    with pytest.raises(OpError) as info:
        run_pipeline(_batch("astronaut"), normalized, models=registry)
    assert info.value.field == field


def test_model_step_without_registry() -> None:
    steps = _steps({"op": "upscale", "method": "model", "model": "any"})
    assert output_shape(10, 20, steps) == (40, 80)  # assumed x4 when no registry is known
    with pytest.raises(OpError, match="serves no super-resolution models") as info:
        run_pipeline(_batch("astronaut", h=10, w=20), steps)
    assert info.value.field == "spec.steps[0].model"


def test_output_shape_uses_model_native_scale() -> None:
    torch.manual_seed(0)
    model = SRVGGNetCompact(3, 3, num_feat=8, num_conv=1, upscale=3).eval()
    registry = _FixedRegistry({"x3": model}, {"x3": 3})
    steps = _steps({"op": "upscale", "method": "model", "model": "x3"}, {"op": "rotate", "angle": 45, "expand": True})
    out = run_pipeline(_batch("astronaut", h=11, w=17), steps, models=registry)
    assert out.shape[-2:] == output_shape(11, 17, steps, models=registry)


def test_deadline_checked_between_steps_and_can_abort() -> None:
    class Expired(Exception):
        pass

    calls = 0

    def deadline() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Expired

    steps = _steps({"op": "invert"}, {"op": "blur"}, {"op": "equalize"}, {"op": "flip"})
    with pytest.raises(Expired):
        run_pipeline(_batch("astronaut"), steps, check_deadline=deadline)
    assert calls == 3


def test_oom_in_any_step_splits_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA OOM cannot occur on a CPU-only machine, so this simulates the device's limit:
    # equalize fails whenever it is handed more than one image at once.
    real = enhance.equalize
    seen: list[int] = []

    def limited(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return real(x)

    batch = _batch("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
    steps = _steps({"op": "blur"}, {"op": "equalize"}, {"op": "invert"})
    expected = run_pipeline(batch, steps)
    monkeypatch.setattr(enhance, "equalize", limited)
    got = run_pipeline(batch, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert seen == [5, 3, 2, 1, 1, 1, 2, 1, 1]


def test_oom_at_batch_one_is_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def always(x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(enhance, "equalize", always)
    with pytest.raises(OutOfMemory) as info:
        run_pipeline(_batch("astronaut", "chelsea"), _steps({"op": "equalize"}))
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
