"""`gpuroute demo` as a user runs it: a real process, its exit code, its table, its files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpuroute_dev.demo import load_examples


def test_demo_completes_every_example(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    result = subprocess.run([sys.executable, "-m", "gpuroute.cli", "demo", "--workdir", str(tmp_path / "state"),
                             "--output-dir", str(out)], capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [job["metadata"]["name"] for job in load_examples()]
    table = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in names]
    assert len(table) == len(names), result.stdout
    assert all(" Completed " in line for line in table), result.stdout
    saved = sorted(p.name for p in out.iterdir())
    assert len(saved) == len(names), saved
    assert all(p.stat().st_size > 1000 for p in out.iterdir())
