"""Super-resolution on CUDA in half precision (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import pipeline, run_pipeline
from gpuroute_worker.sr.registry import ModelRegistry, ModelSource
from gpuroute_worker.sr.rrdbnet import RRDBNet
from gpuroute_worker.sr.srvgg import SRVGGNetCompact
from gpuroute_worker.sr.tiling import tiled_forward
from tests.unit.gpuroute_worker.ops_testutil import photo, save_published, to_tensor

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    folder: Path = tmp_path_factory.mktemp("weights")
    torch.manual_seed(11)
    modules = {
        "rrdb": RRDBNet(3, 3, scale=4, num_feat=16, num_block=2, num_grow_ch=8),
        "vgg": SRVGGNetCompact(3, 3, num_feat=16, num_conv=4, upscale=4),
    }
    sources = {}
    for name, module in modules.items():
        path = folder / f"{name}.pth"
        sources[name] = ModelSource(str(path), save_published(module, path))
    return ModelRegistry(sources)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["rrdb", "vgg"])
def test_half_precision_close_to_float32(registry: ModelRegistry, name: str, dtype: torch.dtype) -> None:
    x = to_tensor(photo("chelsea", 48, 40))
    with torch.no_grad():
        reference = registry.load(name, "cpu", torch.float32)(x)
        half = registry.load(name, "cuda", dtype)(x.cuda().to(dtype)).float().cpu()
    tolerance = 2e-2 if dtype == torch.float16 else 6e-2
    err = float((half - reference).abs().max())
    assert err <= tolerance, f"{name} in {dtype} differs from float32 by {err:.2e}"


def test_pipeline_model_step_on_cuda(registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.cat([to_tensor(photo("chelsea", 40, 44)), to_tensor(photo("coffee", 40, 44))])
    steps = normalize_steps([{"op": "upscale", "method": "model", "model": "rrdb"}])
    on_cpu = run_pipeline(x, steps, models=registry)
    on_gpu = run_pipeline(x.cuda(), steps, models=registry)
    assert on_gpu.dtype == torch.float32 and on_gpu.shape == (2, 3, 160, 176)
    assert float((on_gpu.cpu() - on_cpu).abs().max()) <= 2e-2
    monkeypatch.setattr(pipeline, "DEFAULT_TILE", 16)
    tiled = run_pipeline(x.cuda(), steps, models=registry)
    assert float((tiled - on_gpu).abs().max()) <= 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_half_precision(registry: ModelRegistry, dtype: torch.dtype) -> None:
    model = registry.load("vgg", "cuda", dtype)
    x = to_tensor(photo("astronaut", 64, 70), "cuda").to(dtype)
    with torch.no_grad():
        whole = model(x)
        tiled = tiled_forward(model, x, 4, tile=24, pad=16)
    assert tiled.dtype == dtype
    assert float((tiled.float() - whole.float()).abs().max()) <= 1e-2
