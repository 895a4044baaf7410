"""The op catalogue: defaults, bounds, types, cross-field rules; every error names its field."""

from __future__ import annotations

from typing import Any

import pytest

from gpuroute.ops_catalog import (
    CATALOG,
    CPU_STEP_SECONDS,
    FAMILIES,
    MAX_DIMENSION,
    MAX_STEPS,
    Budget,
    StepError,
    check_budget,
    cost_class,
    models_used,
    normalize_step,
    normalize_steps,
    parse_color,
    step_cpu_seconds,
)


def _error(steps: Any) -> StepError:
    with pytest.raises(StepError) as caught:
        normalize_steps(steps)
    return caught.value


def test_catalogue_shape() -> None:
    assert {spec.family for spec in CATALOG.values()} <= set(FAMILIES)
    for op, spec in CATALOG.items():
        assert spec.doc, op
        for name, param in spec.params.items():
            assert param.kind in ("number", "integer", "boolean", "string", "enum", "color"), (op, name)
            assert param.doc, (op, name)
            if param.kind == "enum":
                assert param.default in param.choices, (op, name)


@pytest.mark.parametrize(("step", "expected"), [
    ({"op": "blur"}, {"op": "blur", "radius": 2.0}),
    ({"op": "sharpen"}, {"op": "sharpen", "radius": 2.0, "percent": 150, "threshold": 3}),
    ({"op": "denoise"}, {"op": "denoise", "method": "median", "size": 3, "radius": 1.0}),
    ({"op": "autocontrast"}, {"op": "autocontrast", "cutoff": 0.0}),
    ({"op": "equalize"}, {"op": "equalize"}),
    ({"op": "invert"}, {"op": "invert"}),
    ({"op": "sepia"}, {"op": "sepia", "amount": 1.0}),
    ({"op": "flip"}, {"op": "flip", "direction": "horizontal"}),
    ({"op": "rotate", "angle": 90}, {"op": "rotate", "angle": 90.0, "expand": False, "method": "bilinear",
                                     "fill": "#000000"}),
    ({"op": "pad", "left": 2}, {"op": "pad", "left": 2, "top": 0, "right": 0, "bottom": 0, "mode": "constant",
                                "fill": "#000000"}),
    ({"op": "crop", "width": 10, "height": 20}, {"op": "crop", "x": 0, "y": 0, "width": 10, "height": 20}),
    ({"op": "upscale", "scale": 2}, {"op": "upscale", "scale": 2.0, "width": None, "height": None,
                                     "method": "bicubic", "model": None}),
    ({"op": "resize", "width": 64}, {"op": "resize", "scale": None, "width": 64, "height": None,
                                     "method": "bicubic"}),
    ({"op": "gamma", "gamma": 2.2}, {"op": "gamma", "gamma": 2.2}),
    ({"op": "brightness", "factor": 1.5}, {"op": "brightness", "factor": 1.5}),
])
def test_defaults_are_filled(step: dict[str, Any], expected: dict[str, Any]) -> None:
    (out,) = normalize_steps([step])
    assert out == expected
    # Types follow the catalogue: numbers become float, integers int.
    for key, value in out.items():
        assert type(value) is type(expected[key]), key


def test_input_is_not_mutated_and_none_means_default() -> None:
    step = {"op": "blur", "radius": None}
    assert normalize_steps([step]) == ({"op": "blur", "radius": 2.0},)
    assert step == {"op": "blur", "radius": None}


def test_normalized_values() -> None:
    out = normalize_steps([
        {"op": "sharpen", "percent": 200.0, "radius": 1},
        {"op": "rotate", "angle": -45, "expand": True, "fill": "#AbCdEf", "method": "nearest"},
        {"op": "denoise", "method": "gaussian", "size": 9, "radius": 0.1},
    ])
    assert out[0] == {"op": "sharpen", "radius": 1.0, "percent": 200, "threshold": 3}
    assert type(out[0]["percent"]) is int and type(out[0]["radius"]) is float
    assert out[1] == {"op": "rotate", "angle": -45.0, "expand": True, "method": "nearest", "fill": "#abcdef"}
    assert out[2]["size"] == 9 and out[2]["method"] == "gaussian"
    assert isinstance(out, tuple) and len(out) == 3


def test_error_names_the_step_index_and_field() -> None:
    err = _error([{"op": "blur"}, {"op": "blur", "radius": 99}])
    assert err.field == "spec.steps[1].radius"
    assert err.message == "must be at most 50, got 99"
    assert str(err) == "spec.steps[1].radius: must be at most 50, got 99"
    assert isinstance(err, ValueError)


def test_unknown_op_lists_known_ops() -> None:
    err = _error([{"op": "invert"}, {"op": "invert"}, {"op": "warp"}])
    assert err.field == "spec.steps[2].op"
    assert "unknown op 'warp'" in err.message
    assert f"known ops: {', '.join(sorted(CATALOG))}" in err.message
    for op in ("autocontrast", "blur", "upscale", "pad", "rotate"):
        assert op in err.message


def test_missing_op() -> None:
    err = _error([{"radius": 2}])
    assert err.field == "spec.steps[0].op"
    assert "unknown op None" in err.message


@pytest.mark.parametrize(("step", "field", "fragment"), [
    ({"op": "blur", "sigma": 2}, "spec.steps[0].sigma", "is not a parameter of blur (parameters: radius)"),
    ({"op": "invert", "amount": 1}, "spec.steps[0].amount", "is not a parameter of invert (parameters: none)"),
    ({"op": "crop", "width": 1, "height": 1, "z": 0, "a": 1}, "spec.steps[0].a", "is not a parameter of crop"),
])
def test_unknown_parameter(step: dict[str, Any], field: str, fragment: str) -> None:
    err = _error([step])
    assert err.field == field
    assert fragment in err.message


@pytest.mark.parametrize(("step", "field", "fragment"), [
    # booleans are never numbers, though bool is an int subclass
    ({"op": "blur", "radius": True}, "spec.steps[0].radius", "must be a number, got bool"),
    ({"op": "sharpen", "percent": False}, "spec.steps[0].percent", "must be a integer, got bool"),
    ({"op": "blur", "radius": "2"}, "spec.steps[0].radius", "must be a number, got str"),
    ({"op": "blur", "radius": [2]}, "spec.steps[0].radius", "must be a number, got list"),
    ({"op": "blur", "radius": float("nan")}, "spec.steps[0].radius", "must be finite"),
    ({"op": "blur", "radius": float("inf")}, "spec.steps[0].radius", "must be finite"),
    # integers: integral floats pass, fractional ones do not
    ({"op": "sharpen", "percent": 150.5}, "spec.steps[0].percent", "must be an integer, got 150.5"),
    ({"op": "crop", "width": 10.25, "height": 1}, "spec.steps[0].width", "must be an integer"),
    # bounds, inclusive
    ({"op": "blur", "radius": 0.05}, "spec.steps[0].radius", "must be at least 0.1, got 0.05"),
    ({"op": "blur", "radius": 50.01}, "spec.steps[0].radius", "must be at most 50, got 50.01"),
    ({"op": "sharpen", "threshold": 256}, "spec.steps[0].threshold", "must be at most 255, got 256"),
    ({"op": "sharpen", "threshold": -1}, "spec.steps[0].threshold", "must be at least 0, got -1"),
    ({"op": "crop", "width": MAX_DIMENSION + 1, "height": 1}, "spec.steps[0].width", "must be at most 16384"),
    ({"op": "rotate", "angle": 361}, "spec.steps[0].angle", "must be at most 360"),
    ({"op": "denoise", "size": 11}, "spec.steps[0].size", "must be at most 9, got 11"),
    ({"op": "denoise", "size": 1}, "spec.steps[0].size", "must be at least 3, got 1"),
    # other kinds
    ({"op": "rotate", "angle": 1, "expand": "yes"}, "spec.steps[0].expand", "must be true or false, got 'yes'"),
    ({"op": "rotate", "angle": 1, "expand": 1}, "spec.steps[0].expand", "must be true or false, got 1"),
    ({"op": "flip", "direction": "diagonal"}, "spec.steps[0].direction",
     "must be one of horizontal, vertical; got 'diagonal'"),
    ({"op": "resize", "scale": 2, "method": "model"}, "spec.steps[0].method", "must be one of nearest, bilinear"),
    ({"op": "pad", "fill": "red"}, "spec.steps[0].fill", "must be a colour as #rrggbb or #rrggbbaa, got 'red'"),
    ({"op": "pad", "fill": "#12345"}, "spec.steps[0].fill", "must be a colour as #rrggbb"),
    ({"op": "pad", "fill": "#1234567"}, "spec.steps[0].fill", "must be a colour as #rrggbb"),
    ({"op": "pad", "fill": "#gg0000"}, "spec.steps[0].fill", "must be a colour as #rrggbb"),
    ({"op": "pad", "fill": 0x123456}, "spec.steps[0].fill", "must be a colour as #rrggbb"),
    ({"op": "upscale", "method": "model", "model": ""}, "spec.steps[0].model",
     "must be a non-empty string of at most 253 characters"),
    ({"op": "upscale", "method": "model", "model": "m" * 254}, "spec.steps[0].model", "at most 253 characters"),
    ({"op": "upscale", "method": "model", "model": 4}, "spec.steps[0].model", "non-empty string"),
    # required parameters
    ({"op": "gamma"}, "spec.steps[0].gamma", "is required for gamma"),
    ({"op": "contrast"}, "spec.steps[0].factor", "is required for contrast"),
    ({"op": "rotate"}, "spec.steps[0].angle", "is required for rotate"),
    ({"op": "crop", "width": 10}, "spec.steps[0].height", "is required for crop"),
])
def test_parameter_errors(step: dict[str, Any], field: str, fragment: str) -> None:
    err = _error([step])
    assert err.field == field
    assert fragment in err.message


@pytest.mark.parametrize(("step", "key", "value"), [
    ({"op": "blur", "radius": 0.1}, "radius", 0.1),
    ({"op": "blur", "radius": 50}, "radius", 50.0),
    ({"op": "sharpen", "threshold": 255}, "threshold", 255),
    ({"op": "sharpen", "percent": 0}, "percent", 0),
    ({"op": "rotate", "angle": -360}, "angle", -360.0),
    ({"op": "crop", "width": MAX_DIMENSION, "height": 1}, "width", MAX_DIMENSION),
    ({"op": "saturation", "factor": 0}, "factor", 0.0),
    ({"op": "upscale", "scale": 16}, "scale", 16.0),
])
def test_bounds_are_inclusive(step: dict[str, Any], key: str, value: Any) -> None:
    assert normalize_steps([step])[0][key] == value


@pytest.mark.parametrize(("step", "field", "fragment"), [
    ({"op": "upscale"}, "spec.steps[0]", "upscale needs `scale` or `width`/`height`"),
    ({"op": "resize"}, "spec.steps[0]", "resize needs `scale` or `width`/`height`"),
    ({"op": "resize", "method": "nearest"}, "spec.steps[0]", "resize needs"),
    ({"op": "upscale", "scale": 2, "width": 100}, "spec.steps[0].scale", "not both"),
    ({"op": "resize", "scale": 0.5, "height": 100}, "spec.steps[0].scale", "set either `scale` or `width`/`height`"),
    ({"op": "upscale", "method": "model"}, "spec.steps[0].model", "method `model` needs the name of a model"),
    ({"op": "upscale", "scale": 4, "method": "model"}, "spec.steps[0].model", "needs the name of a model"),
    ({"op": "upscale", "scale": 4, "model": "x4"}, "spec.steps[0].method", "`model` is set, so `method` must be"),
    ({"op": "upscale", "scale": 4, "model": "x4", "method": "lanczos"}, "spec.steps[0].method", "must be `model`"),
    ({"op": "denoise", "size": 4}, "spec.steps[0].size", "must be odd, got 4"),
    ({"op": "denoise", "size": 8.0}, "spec.steps[0].size", "must be odd, got 8"),
])
def test_cross_field_rules(step: dict[str, Any], field: str, fragment: str) -> None:
    err = _error([step])
    assert err.field == field
    assert fragment in err.message


def test_cross_field_error_names_the_step_index() -> None:
    err = _error([{"op": "invert"}, {"op": "denoise", "size": 6}])
    assert err.field == "spec.steps[1].size"


@pytest.mark.parametrize("step", [
    {"op": "upscale", "width": 100},
    {"op": "upscale", "height": 100},
    {"op": "upscale", "width": 100, "height": 50},
    {"op": "upscale", "method": "model", "model": "realesrgan-x4"},
    {"op": "upscale", "method": "model", "model": "realesrgan-x4", "scale": 2},
    {"op": "resize", "scale": 0.5},
    {"op": "resize", "width": 10, "height": 10},
    {"op": "denoise", "size": 5},
])
def test_cross_field_accepted(step: dict[str, Any]) -> None:
    assert normalize_steps([step])[0]["op"] == step["op"]


def test_step_count_limits() -> None:
    assert len(normalize_steps([{"op": "invert"}] * MAX_STEPS)) == MAX_STEPS == 16
    for steps in ([], [{"op": "invert"}] * (MAX_STEPS + 1)):
        err = _error(steps)
        assert err.field == "spec.steps"
        assert err.message == f"must hold 1 to 16 steps, got {len(steps)}"


@pytest.mark.parametrize("steps", [None, "blur", b"blur", {"op": "blur"}, 3])
def test_steps_must_be_a_list(steps: Any) -> None:
    err = _error(steps)
    assert (err.field, err.message) == ("spec.steps", "must be a list of steps")


@pytest.mark.parametrize("step", ["blur", None, ["op", "blur"], 7])
def test_step_must_be_an_object(step: Any) -> None:
    err = _error([{"op": "invert"}, step])
    assert err.field == "spec.steps[1]"
    assert err.message.startswith("must be an object like {op: blur, radius: 2}, got ")


def test_normalize_step_directly() -> None:
    assert normalize_step(5, {"op": "gamma", "gamma": 2}) == {"op": "gamma", "gamma": 2.0}
    with pytest.raises(StepError) as caught:
        normalize_step(5, {"op": "gamma", "gamma": 0})
    assert caught.value.field == "spec.steps[5].gamma"


def test_models_used() -> None:
    steps = normalize_steps([
        {"op": "upscale", "method": "model", "model": "x4"},
        {"op": "upscale", "scale": 2},
        {"op": "blur"},
        {"op": "upscale", "method": "model", "model": "x2"},
        {"op": "upscale", "method": "model", "model": "x4"},
    ])
    assert models_used(steps) == frozenset({"x4", "x2"})
    assert models_used(normalize_steps([{"op": "resize", "scale": 2}])) == frozenset()


@pytest.mark.parametrize(("text", "rgb"), [
    ("#000000", (0, 0, 0)),
    ("#ffffff", (255, 255, 255)),
    ("#FF8000", (255, 128, 0)),
    ("#0a0b0c", (10, 11, 12)),
])
def test_parse_color(text: str, rgb: tuple[int, int, int]) -> None:
    assert parse_color(text) == rgb


def test_cost_class_keeps_what_changes_cost_per_pixel() -> None:
    sr = normalize_steps([{"op": "upscale", "method": "model", "model": "realesrgan-x4", "scale": 4},
                          {"op": "brightness", "factor": 1.2}])
    assert cost_class(sr) == "upscale(method=model,model=realesrgan-x4,scale=4)>brightness"
    # Factors and colours do not change the work per pixel; filters, radii and methods do.
    assert cost_class(normalize_steps([{"op": "brightness", "factor": 0.5}])) == \
        cost_class(normalize_steps([{"op": "brightness", "factor": 1.5}]))
    assert cost_class(normalize_steps([{"op": "blur", "radius": 2}])) != \
        cost_class(normalize_steps([{"op": "blur", "radius": 8}]))
    assert cost_class(normalize_steps([{"op": "upscale", "scale": 2, "method": "lanczos"}])) == \
        "upscale(method=lanczos,scale=2)"
    # Order matters: the ops run on different sizes.
    assert cost_class(normalize_steps([{"op": "upscale", "scale": 2}, {"op": "sharpen"}])) != \
        cost_class(normalize_steps([{"op": "sharpen"}, {"op": "upscale", "scale": 2}]))


def test_cpu_step_budget_refuses_a_median_that_would_hold_the_only_thread_for_minutes() -> None:
    steps = normalize_steps([{"op": "resize", "scale": 1.0}, {"op": "denoise", "size": 9}])
    shapes = [(7696, 7696)] * 3
    cpu = Budget(max_pixels=10**9, max_bytes=1 << 40, max_step_cpu_s=CPU_STEP_SECONDS)
    with pytest.raises(StepError, match=r"spec\.steps\[1\]: denoise on 7696x7696 would take about \d+ s") as caught:
        check_budget(steps, shapes, 3, cpu)
    assert caught.value.field == "spec.steps[1]"
    # The GPU has no such limit; and smaller windows or images fit.
    check_budget(steps, shapes, 3, Budget(max_pixels=10**9, max_bytes=1 << 40))
    check_budget(normalize_steps([{"op": "denoise", "size": 3}]), shapes[:2], 3, cpu)
    check_budget(steps, [(3024, 4032)] * 3, 3, cpu)


def test_cpu_seconds_grow_with_the_window_and_no_other_step_nears_the_limit() -> None:
    big = (16384, 16384)
    costs = [step_cpu_seconds(normalize_step(0, {"op": "denoise", "size": size}), 3, (4000, 4000), (4000, 4000))
             for size in (5, 7, 9)]
    assert costs == sorted(costs) and costs[2] / costs[0] == pytest.approx(81 / 25)
    for op in ("blur", "sharpen", "rotate", "edges", "equalize", "saturation", "sepia"):
        params = {"rotate": {"angle": 10}, "saturation": {"factor": 2}}.get(op, {})
        assert step_cpu_seconds(normalize_step(0, {"op": op, **params}), 4, big, big) < CPU_STEP_SECONDS, op
