"""Real-ESRGAN architectures and the model registry.

Published-size models are built on the meta device (shapes only, no memory, no run)
to check parameter names and shapes against Real-ESRGAN's release files; small models
are saved in the published .pth format, loaded back through ModelRegistry and run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import pipeline, run_pipeline
from gpuroute_worker.sr import registry as registry_module
from gpuroute_worker.sr.registry import (
    ChecksumMismatch,
    ModelLoadError,
    ModelRegistry,
    ModelSource,
    UnknownModel,
    detect_architecture,
)
from gpuroute_worker.sr.rrdbnet import RRDBNet
from gpuroute_worker.sr.srvgg import SRVGGNetCompact
from tests.unit.gpuroute_worker.ops_testutil import photo, save_published, to_tensor


def _rrdb_keys(num_block: int) -> list[str]:
    keys = ["conv_first"]
    keys += [f"body.{b}.rdb{r}.conv{c}" for b in range(num_block) for r in (1, 2, 3) for c in range(1, 6)]
    keys += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    return [f"{k}.{p}" for k in keys for p in ("weight", "bias")]


@pytest.mark.parametrize(("scale", "in_ch"), [(4, 3), (2, 12), (1, 48)])
def test_rrdbnet_published_names_and_shapes(scale: int, in_ch: int) -> None:
    # RealESRGAN_x4plus / RealESRNet_x4plus / RealESRGAN_x2plus: 23 blocks, 64 features, growth 32.
    with torch.device("meta"):
        state = RRDBNet(3, 3, scale=scale, num_feat=64, num_block=23, num_grow_ch=32).state_dict()
    assert list(state) == _rrdb_keys(23)
    assert state["conv_first.weight"].shape == (64, in_ch, 3, 3)
    assert state["body.22.rdb3.conv1.weight"].shape == (32, 64, 3, 3)
    assert state["body.0.rdb1.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert state["conv_last.weight"].shape == (3, 64, 3, 3)
    spec = detect_architecture(state)
    assert (spec.arch, spec.scale) == ("rrdbnet", scale)
    assert dict(spec.params) == dict(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=64, num_block=23, num_grow_ch=32)


def test_rrdbnet_anime_6b_detected() -> None:
    with torch.device("meta"):
        state = RRDBNet(3, 3, scale=4, num_feat=64, num_block=6, num_grow_ch=32).state_dict()
    assert detect_architecture(state).params["num_block"] == 6


@pytest.mark.parametrize("num_conv", [32, 16])
def test_srvgg_published_names_and_shapes(num_conv: int) -> None:
    # realesr-general-x4v3 (32 convs) and realesr-animevideov3 (16 convs).
    with torch.device("meta"):
        state = SRVGGNetCompact(3, 3, num_feat=64, num_conv=num_conv, upscale=4, act_type="prelu").state_dict()
    last = 2 + 2 * num_conv
    expected = ["body.0.weight", "body.0.bias"]
    for i in range(1, last, 2):
        expected.append(f"body.{i}.weight")  # PReLU, one slope per feature
        expected += [f"body.{i + 1}.weight", f"body.{i + 1}.bias"]
    assert list(state) == expected
    assert state["body.1.weight"].shape == (64,)
    assert state[f"body.{last}.weight"].shape == (3 * 4 * 4, 64, 3, 3)
    spec = detect_architecture(state)
    assert (spec.arch, spec.scale) == ("srvgg", 4)
    assert spec.params["num_conv"] == num_conv and spec.params["num_feat"] == 64


def _small_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(1234)
    return {
        "rrdb-x4": RRDBNet(3, 3, scale=4, num_feat=16, num_block=2, num_grow_ch=8).eval(),
        "rrdb-x2": RRDBNet(3, 3, scale=2, num_feat=16, num_block=1, num_grow_ch=8).eval(),
        "rrdb-x1": RRDBNet(3, 3, scale=1, num_feat=16, num_block=1, num_grow_ch=8).eval(),
        "vgg-x4": SRVGGNetCompact(3, 3, num_feat=16, num_conv=4, upscale=4).eval(),
        "vgg-x3": SRVGGNetCompact(3, 3, num_feat=8, num_conv=2, upscale=3).eval(),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.nn.Module], dict[str, ModelSource]]:
    folder = tmp_path_factory.mktemp("weights")
    models = _small_models()
    sources = {}
    for name, module in models.items():
        path = folder / f"{name}.pth"
        sources[name] = ModelSource(str(path), save_published(module, path))
    return models, sources


def test_registry_loads_published_format_and_caches(saved: tuple[dict, dict]) -> None:
    models, sources = saved
    registry = ModelRegistry(sources)
    x = torch.rand(1, 3, 12, 16)
    for name, original in models.items():
        loaded = registry.load(name, "cpu", torch.float32)
        assert type(loaded) is type(original) and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
        assert registry.load(name, torch.device("cpu"), torch.float32) is loaded
    assert {n: registry.scale(n) for n in models} == {"rrdb-x4": 4, "rrdb-x2": 2, "rrdb-x1": 1, "vgg-x4": 4, "vgg-x3": 3}
    assert registry.load("vgg-x4", "cpu", torch.float64) is not registry.load("vgg-x4", "cpu", torch.float32)


@pytest.mark.parametrize("key", ["params", None])
def test_registry_accepts_params_and_bare_state_dicts(tmp_path: Path, key: str | None) -> None:
    module = SRVGGNetCompact(3, 3, num_feat=8, num_conv=1, upscale=2)
    digest = save_published(module, tmp_path / "m.pth", key=key)
    loaded = ModelRegistry({"m": ModelSource(str(tmp_path / "m.pth"), digest)}).load("m", "cpu")
    assert torch.equal(loaded.state_dict()["body.0.weight"], module.state_dict()["body.0.weight"])


def test_wrong_checksum_refused_before_unpickling(saved: tuple[dict, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    _, sources = saved
    right = sources["vgg-x4"].sha256
    wrong = hashlib.sha256(b"something else").hexdigest()
    registry = ModelRegistry({"vgg-x4": ModelSource(sources["vgg-x4"].path_or_uri, wrong)})

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load ran before the checksum was verified")

    monkeypatch.setattr(registry_module.torch, "load", no_load)
    with pytest.raises(ChecksumMismatch) as info:
        registry.load("vgg-x4", "cpu")
    message = str(info.value)
    assert "vgg-x4" in message and right in message and wrong in message
    with pytest.raises(ChecksumMismatch):
        registry.scale("vgg-x4")


def test_unknown_model_and_unreadable_files(tmp_path: Path) -> None:
    registry = ModelRegistry({"gone": ModelSource(str(tmp_path / "missing.pth"), "0" * 64)})
    with pytest.raises(UnknownModel, match="gone"):
        registry.load("nope", "cpu")
    with pytest.raises(ModelLoadError, match="cannot read"):
        registry.load("gone", "cpu")


def test_remote_uri_goes_through_fetch_hook(saved: tuple[dict, dict]) -> None:
    sources = saved[1]
    blob = Path(sources["vgg-x3"].path_or_uri).read_bytes()
    fetched: list[str] = []

    def fetch(uri: str) -> bytes:
        fetched.append(uri)
        return blob

    uri = "s3://models/vgg-x3.pth"
    registry = ModelRegistry({"m": ModelSource(uri, "sha256:" + sources["vgg-x3"].sha256.upper())}, fetch=fetch)
    assert registry.scale("m") == 3
    registry.load("m", "cpu")
    assert fetched and set(fetched) == {uri}
    with pytest.raises(ModelLoadError, match="no fetch hook"):
        ModelRegistry({"m": ModelSource(uri, sources["vgg-x3"].sha256)}).load("m", "cpu")


def test_weights_that_match_no_architecture_are_refused(tmp_path: Path) -> None:
    torch.save({"params_ema": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "odd.pth")
    digest = hashlib.sha256((tmp_path / "odd.pth").read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match="neither RRDBNet nor SRVGGNetCompact"):
        ModelRegistry({"odd": ModelSource(str(tmp_path / "odd.pth"), digest)}).load("odd", "cpu")


@pytest.mark.parametrize("name", ["rrdb-x4", "rrdb-x2", "rrdb-x1", "vgg-x4", "vgg-x3"])
def test_model_upscale_through_pipeline(saved: tuple[dict, dict], name: str) -> None:
    # 27x22 is not a multiple of 2 or 4: pixel-unshuffle models get mirrored padding.
    models, sources = saved
    registry = ModelRegistry(sources)
    x = to_tensor(photo("chelsea", 22, 27))
    steps = normalize_steps([{"op": "upscale", "method": "model", "model": name}])
    out = run_pipeline(x, steps, models=registry)
    scale = registry.scale(name)
    assert out.shape == (1, 3, 22 * scale, 27 * scale)
    assert out.min() >= 0.0 and out.max() <= 1.0
    if models[name].input_multiple == 1:
        with torch.no_grad():
            direct = models[name](x).clamp(0, 1)
        torch.testing.assert_close(out, direct, rtol=0, atol=1e-6)


def test_model_upscale_tiled_equals_untiled(saved: tuple[dict, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry(saved[1])
    x = torch.cat([to_tensor(photo("astronaut", 30, 27)), to_tensor(photo("chelsea", 30, 27))])
    steps = normalize_steps([{"op": "upscale", "method": "model", "model": "rrdb-x4"}])
    untiled = run_pipeline(x, steps, models=registry)
    monkeypatch.setattr(pipeline, "DEFAULT_TILE", 16)
    tiles = 0

    def count() -> None:
        nonlocal tiles
        tiles += 1

    tiled = run_pipeline(x, steps, models=registry, check_deadline=count)
    assert tiles >= 4, "the 30x27 input should have been cut into 16-pixel tiles"
    err = float((tiled - untiled).abs().max())
    assert err <= 1e-4, f"tiled x4 differs from untiled by {err:.2e}"


def test_model_with_target_size_resizes_native_output(saved: tuple[dict, dict]) -> None:
    registry = ModelRegistry(saved[1])
    x = to_tensor(photo("astronaut", 20, 30))
    steps = normalize_steps([{"op": "upscale", "method": "model", "model": "vgg-x4", "width": 100}])
    assert run_pipeline(x, steps, models=registry).shape == (1, 3, 67, 100)
