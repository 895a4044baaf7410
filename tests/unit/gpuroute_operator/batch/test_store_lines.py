"""Splitting a streamed object into lines of bounded length (batch/store.split_lines, pure)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpuroute_operator.batch.store import split_lines


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_lines_come_back_whatever_the_chunking(size: int) -> None:
    data = b"s3://b/a.png\r\ns3://b/b.png\n\n# note\ns3://b/last.png"
    assert list(split_lines(_chunks(data, size), 64)) == [b"s3://b/a.png", b"s3://b/b.png", b"", b"# note",
                                                          b"s3://b/last.png"]
    assert list(split_lines(_chunks(b"one\n", size), 64)) == [b"one"]


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_an_overlong_line_is_none_and_the_next_line_is_whole(size: int) -> None:
    data = b"short\n" + b"x" * 100 + b"\nafter\n" + b"y" * 100
    assert list(split_lines(_chunks(data, size), 10)) == [b"short", None, b"after", None]
    assert list(split_lines(_chunks(b"x" * 10 + b"\r\n", size), 10)) == [b"x" * 10]


def test_an_endless_line_is_never_held() -> None:
    def endless() -> Iterator[bytes]:
        for _ in range(10_000):  # 640 MB without a line end
            yield b"z" * 65536

    lines = split_lines(endless(), 1024)
    assert next(lines) is None  # ends after 640 MB streamed by, each chunk dropped as it came
    assert next(lines, "end") == "end"
