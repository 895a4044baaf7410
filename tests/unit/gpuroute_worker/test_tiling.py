"""Tiled inference and the out-of-memory fallback of the model step.

CUDA out-of-memory cannot occur on a CPU-only machine, so the fallback is driven by
_OomAbove: a real small model wrapped to raise torch.cuda.OutOfMemoryError whenever its
input holds more pixels than a limit, simulating the device's memory limit. The
results must equal the unconstrained run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import OutOfMemory, pipeline, run_pipeline
from gpuroute_worker.sr.registry import ModelRegistry, ModelSource
from gpuroute_worker.sr.rrdbnet import RRDBNet
from gpuroute_worker.sr.srvgg import SRVGGNetCompact
from gpuroute_worker.sr.tiling import tiled_forward
from tests.unit.gpuroute_worker.ops_testutil import photo, to_tensor


class _OomAbove(nn.Module):
    """Simulated device limit: refuses (as CUDA would) inputs over `limit` pixels (N * H * W)."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.calls: list[tuple[int, ...]] = []

    @property
    def input_multiple(self) -> int:
        return int(getattr(self.inner, "input_multiple", 1))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(tuple(x.shape))
        if x.shape[0] * x.shape[2] * x.shape[3] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: CUDA out of memory for input {tuple(x.shape)}")
        return self.inner(x)

    def failed(self) -> list[tuple[int, ...]]:
        return [s for s in self.calls if s[0] * s[2] * s[3] > self.limit]


class _OneModel(ModelRegistry):
    """A registry serving one in-memory module as 'm'."""

    def __init__(self, module: nn.Module, scale: int) -> None:
        super().__init__({"m": ModelSource("memory:m", "0" * 64)})
        self.module = module
        self.native = scale

    def scale(self, name: str) -> int:
        self._source(name)
        return self.native

    def load(self, name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> nn.Module:
        self._source(name)
        return self.module


STEPS = normalize_steps([{"op": "upscale", "method": "model", "model": "m"}])


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(3)
    return SRVGGNetCompact(3, 3, num_feat=8, num_conv=2, upscale=4).eval()


def test_tiles_reassemble_exactly_for_a_pointwise_model() -> None:
    def nearest_x3(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=3, mode="nearest")

    x = torch.rand(2, 3, 37, 29)
    for tile, pad in [(8, 0), (10, 3), (16, 16), (64, 2)]:
        assert torch.equal(tiled_forward(nearest_x3, x, 3, tile=tile, pad=pad), nearest_x3(x)), (tile, pad)


def test_tiled_equals_untiled_when_pad_covers_receptive_field(vgg: nn.Module) -> None:
    x = torch.cat([to_tensor(photo("astronaut", 41, 50)), to_tensor(photo("coffee", 41, 50))])
    with torch.no_grad():
        whole = vgg(x)
        for tile in (17, 24, 40):
            err = float((tiled_forward(vgg, x, 4, tile=tile, pad=16) - whole).abs().max())
            assert err <= 1e-5, f"tile {tile}: {err:.2e}"


def test_unshuffle_models_keep_tiles_on_their_grid() -> None:
    # Scale-1 RRDBNet pixel-unshuffles by 4: odd tiles and pads are rounded to that grid.
    torch.manual_seed(5)
    model = RRDBNet(3, 3, scale=1, num_feat=8, num_block=1, num_grow_ch=4).eval()
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        whole = model(x)
        tiled = tiled_forward(model, x, 1, tile=18, pad=13, multiple=4)
    # A tile off the grid would mix up sub-pixel phases (errors near 0.1); on the grid the
    # only difference is context beyond the 16-pixel pad (measured 2.8e-5).
    err = float((tiled - whole).abs().max())
    assert err <= 1e-4, f"tiled scale-1 RRDBNet differs by {err:.2e}"
    with pytest.raises(ValueError, match="multiple of 4"):
        tiled_forward(model, torch.rand(1, 3, 39, 36), 1, tile=16, multiple=4)


def test_deadline_checked_between_tiles(vgg: nn.Module) -> None:
    calls = 0

    def deadline() -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise TimeoutError("job ran past its timeout")

    with torch.no_grad(), pytest.raises(TimeoutError):
        tiled_forward(vgg, torch.rand(1, 3, 40, 40), 4, tile=10, pad=2, check_deadline=deadline)
    assert calls == 4


def _run(module: nn.Module, x: Tensor) -> Tensor:
    return run_pipeline(x, STEPS, models=_OneModel(module, 4))


def test_oom_splits_batch_then_succeeds(vgg: nn.Module) -> None:
    x = torch.cat([to_tensor(photo(n, 24, 20)) for n in ("astronaut", "chelsea", "coffee", "rocket")])
    expected = _run(vgg, x)
    limited = _OomAbove(vgg, limit=24 * 20)  # one image at a time fits
    got = _run(limited, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [s[0] for s in limited.calls] == [4, 2, 1, 1, 2, 1, 1]


def test_oom_at_batch_one_shrinks_tiles(vgg: nn.Module) -> None:
    x = to_tensor(photo("chelsea", 150, 140))
    expected = _run(vgg, x)
    limited = _OomAbove(vgg, limit=110 * 110)
    got = _run(limited, x)
    err = float((got - expected).abs().max())
    assert err <= 1e-4, f"tiled fallback differs from the untiled run by {err:.2e}"
    # First the whole image (it fits one 512 tile), then 75-pixel tiles with 16 pixels of
    # context on their inner side (two tiles per axis, so no tile has context on both).
    assert limited.failed() == [(1, 3, 150, 140)]
    assert max(s[2] for s in limited.calls[1:]) == 75 + pipeline.TILE_PAD


def test_oom_splits_batch_and_shrinks_tiles(vgg: nn.Module) -> None:
    x = torch.cat([to_tensor(photo("astronaut", 150, 140)), to_tensor(photo("coffee", 150, 140))])
    expected = _run(vgg, x)
    limited = _OomAbove(vgg, limit=110 * 110)
    torch.testing.assert_close(_run(limited, x), expected, rtol=0, atol=1e-4)
    assert limited.failed()[:2] == [(2, 3, 150, 140), (1, 3, 150, 140)]


def test_oom_below_smallest_tile_raises_out_of_memory(vgg: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[bool] = []
    monkeypatch.setattr(pipeline, "_release", lambda device: released.append(True))
    limited = _OomAbove(vgg, limit=50 * 50)
    with pytest.raises(OutOfMemory, match="64-pixel tiles") as info:
        _run(limited, to_tensor(photo("rocket", 150, 140)))
    assert isinstance(info.value, RuntimeError)
    # The whole image, then the first 75-pixel tile, then the first 64-pixel tile (each
    # with 16 pixels of context on its inner sides); memory freed before each retry.
    assert limited.failed() == [(1, 3, 150, 140), (1, 3, 91, 91), (1, 3, 80, 80)]
    assert len(released) == 2
