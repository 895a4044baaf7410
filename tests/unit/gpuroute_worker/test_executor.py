"""The GPU executor's dynamic batching, exercised on the CPU with batching forced on:
compatible requests share a batch, others do not, and every request gets exactly one
answer. Without it (the CPU default) nothing waits for batch-mates."""

from __future__ import annotations

from concurrent.futures import wait

import pytest
import torch

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.executor import BatchExecutor

INVERT = normalize_steps([{"op": "invert"}])
FLIP = normalize_steps([{"op": "flip"}])


def _image(h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def executor() -> BatchExecutor:
    ex = BatchExecutor(torch.device("cpu"), None, max_batch=4, max_wait_ms=200.0, batching=True)
    yield ex
    ex.close()


def test_cpu_default_runs_each_request_at_once_without_waiting() -> None:
    ex = BatchExecutor(torch.device("cpu"), None, max_batch=4, max_wait_ms=5000.0)
    try:
        assert ex.batching is False
        image = _image()
        result = ex.submit(INVERT, image).result(timeout=2.0)  # a 5 s batch wait would time out
        assert result.batch_size == 1
        assert torch.equal(result.pixels, 255 - image)
        assert ex.copies.h2d == ex.copies.d2h == 0
    finally:
        ex.close()


def test_compatible_requests_share_a_batch_and_get_their_own_result(executor: BatchExecutor) -> None:
    images = [_image(seed=i) for i in range(4)]
    futures = [executor.submit(INVERT, img) for img in images]
    wait(futures, timeout=30)
    for image, future in zip(images, futures, strict=True):
        result = future.result()
        assert result.batch_size == 4
        assert torch.equal(result.pixels, 255 - image)


def test_different_pipelines_or_shapes_are_not_batched_together(executor: BatchExecutor) -> None:
    futures = [executor.submit(INVERT, _image()), executor.submit(FLIP, _image()),
               executor.submit(INVERT, _image(20, 24)), executor.submit(INVERT, _image(seed=5))]
    wait(futures, timeout=30)
    sizes = [f.result().batch_size for f in futures]
    assert sizes[1] == 1 and sizes[2] == 1  # alone: different pipeline, different shape
    assert sizes[0] == sizes[3] == 2        # the two compatible inverts ran together
    assert torch.equal(futures[1].result().pixels, _image().flip(-1))


def test_a_request_past_its_deadline_fails_alone(executor: BatchExecutor) -> None:
    class Late(Exception):
        pass

    def expired() -> None:
        raise Late("past deadline")

    ok = executor.submit(INVERT, _image())
    late = executor.submit(INVERT, _image(), check_deadline=expired)
    wait([ok, late], timeout=30)
    assert torch.equal(ok.result().pixels, 255 - _image())
    with pytest.raises(Late):
        late.result()


def test_a_failing_batch_answers_every_member(executor: BatchExecutor) -> None:
    crop = normalize_steps([{"op": "crop", "x": 100, "y": 0, "width": 4, "height": 4}])  # outside a 24-wide image
    futures = [executor.submit(crop, _image(seed=i)) for i in range(3)]
    wait(futures, timeout=30)
    assert all(isinstance(f.exception(), ValueError) for f in futures)
    assert torch.equal(executor.submit(INVERT, _image()).result(timeout=30).pixels, 255 - _image())


def test_a_batch_never_plans_more_memory_than_the_budget() -> None:
    # Every batch-mate is charged its estimate: compatible requests wait for the next batch
    # rather than join one whose summed estimate would pass the budget.
    ex = BatchExecutor(torch.device("cpu"), None, max_batch=8, max_wait_ms=300.0, batching=True, max_working_bytes=1000)
    try:
        needs = [600, 300, 300, 500, 100, 1500, 200, 400, 400, 400]
        images = [_image(seed=i) for i in range(len(needs))]
        futures = [ex.submit(INVERT, image, need_bytes=need) for image, need in zip(images, needs, strict=True)]
        wait(futures, timeout=60)
        batches: dict[float, list[int]] = {}
        for need, image, future in zip(needs, images, futures, strict=True):
            result = future.result()
            assert torch.equal(result.pixels, 255 - image)
            batches.setdefault(result.compute_ms, []).append(need)  # members share their batch's time
        for members in batches.values():
            # One request alone runs whatever its estimate (admitted on its own); a batch fits.
            assert len(members) == 1 or sum(members) <= 1000, batches
        assert [1500] in batches.values()
    finally:
        ex.close()


def test_requests_without_estimates_still_batch() -> None:
    ex = BatchExecutor(torch.device("cpu"), None, max_batch=4, max_wait_ms=300.0, batching=True, max_working_bytes=1000)
    try:
        futures = [ex.submit(INVERT, _image(seed=i)) for i in range(4)]
        wait(futures, timeout=30)
        assert [f.result().batch_size for f in futures] == [4] * 4
    finally:
        ex.close()
