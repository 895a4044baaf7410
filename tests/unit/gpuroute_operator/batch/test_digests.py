"""The compact digest set a batch keeps its inputs in (pure)."""

from __future__ import annotations

import tracemalloc

from gpuroute_operator.batch.digests import DigestSet


def test_members_stay_members_across_spills_and_merges() -> None:
    digests = DigestSet(recent=64, max_run=1024)
    names = [f"s3://bucket/in/img-{i:06d}.png" for i in range(5000)]
    assert all(digests.add(name) for name in names)
    assert len(digests) == 5000
    assert not any(digests.add(name) for name in names[::7])  # already members
    assert all(name in digests for name in names)
    assert not any(f"s3://bucket/in/other-{i}.png" in digests for i in range(5000))
    assert len(digests) == 5000 and 5000 * 8 - 64 * 8 <= digests.nbytes <= 5000 * 8
    assert 3 not in digests  # not a string
    assert max(len(run) for run in digests._runs) <= 1024 and len(digests._runs) <= 5000 // 1024 + 8
    digests.clear()
    assert len(digests) == 0 and names[0] not in digests and digests.add(names[0])


def test_keys_differ_per_set_and_the_same_key_gives_the_same_members() -> None:
    a, b = DigestSet(key=b"k" * 16), DigestSet(key=b"k" * 16)
    a.add("x")
    b.add("x")
    assert a._recent == b._recent != DigestSet(key=b"j" * 16)._recent
    assert DigestSet(key=b"k" * 16)._digest("x") != DigestSet(key=b"j" * 16)._digest("x")


def test_a_hundred_thousand_members_cost_about_eight_bytes_each() -> None:
    names = [f"s3://tenant-bucket/photos/2026/12/06/camera-{i:07d}.jpg" for i in range(100_000)]
    tracemalloc.start()
    try:
        digests = DigestSet()
        for name in names:
            digests.add(name)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A set of these strings holds about 140 bytes a member (the strings alone are 100+).
    assert held < 100_000 * 8 + 2 * 1024 * 1024, held
