"""The production images install the shared package and their own side, nothing else.

No Docker engine runs here, so the images are checked without one: what each Dockerfile
COPYs into its build stage, what .dockerignore keeps out of the context, and then the real
wheel that setuptools builds (offline: pip wheel --no-deps --no-build-isolation) from a
directory laid out exactly as those COPY lines lay it out, whose packages must be those the
image should hold. The same build of the whole development layout must still hold gpuroute_dev.
"""

from __future__ import annotations

import os
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest

from gpuroute.cli import DEMO_NEEDS_CHECKOUT

REPO = Path(__file__).resolve().parents[2]
DEV_ONLY = ("gpuroute_dev", "bench", "tests")
"""Top-level folders no image may copy or install."""


@dataclass(frozen=True)
class Copy:
    """One COPY instruction of a Dockerfile's build stage."""

    sources: tuple[str, ...]
    """Paths in the build context, as written."""
    dest: str
    """Destination, relative to the WORKDIR."""


@dataclass(frozen=True)
class Layout:
    """What one build tree holds and what its wheel must contain."""

    sources: frozenset[str]
    """Files and folders of the repository the tree is made of."""
    package_roots: tuple[Path, ...]
    """Repository folders (each a top-level package) whose packages the wheel must hold, all and only."""
    data: tuple[str, ...]
    """Package data files (paths inside the wheel) that must come along."""


SHARED = REPO / "gpuroute"
OPERATOR = REPO / "operator" / "gpuroute_operator"
WORKER = REPO / "worker_image" / "gpuroute_worker"
IMAGES = {
    "Dockerfile.operator": Layout(frozenset({"pyproject.toml", "README.md", "gpuroute/", "operator/"}),
                                  (SHARED, OPERATOR), ("gpuroute_operator/web/static/status.html",)),
    "Dockerfile.worker": Layout(frozenset({"pyproject.toml", "README.md", "gpuroute/", "worker_image/"}),
                                (SHARED, WORKER), ()),
}
DEVELOPMENT = Layout(frozenset({"pyproject.toml", "README.md", "gpuroute/", "operator/", "worker_image/", "gpuroute_dev/"}),
                     (SHARED, OPERATOR, WORKER, REPO / "gpuroute_dev"),
                     ("gpuroute_operator/web/static/status.html", "gpuroute_dev/localenv/kube-assets.sh"))


def dockerfile_copies(path: Path) -> list[Copy]:
    """The COPY instructions, continuation lines joined; flags (--chown and such) dropped."""
    text = path.read_text().replace("\\\n", " ")
    copies: list[Copy] = []
    for line in text.splitlines():
        words = line.split(None, 1)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        assert words[0].upper() == "COPY", f"{path.name}: ADD fetches and unpacks; the images use COPY only: {line}"
        args = [a for a in shlex.split(words[1]) if not a.startswith("--")]
        assert not args[0].startswith("["), f"{path.name}: this reader knows only COPY's plain form: {line}"
        assert not PurePosixPath(args[-1]).is_absolute(), f"{path.name}: COPY into the WORKDIR only: {line}"
        copies.append(Copy(tuple(args[:-1]), args[-1]))
    return copies


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "this reader does not know .dockerignore exceptions"
    return patterns


def ignored(rel: PurePosixPath, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns this repository uses: a matching folder drops all below it."""
    for depth in range(1, len(rel.parts) + 1):
        prefix = PurePosixPath(*rel.parts[:depth])
        for pattern in patterns:
            if pattern.startswith("**/") and fnmatch(prefix.name, pattern[3:]):
                return True
            if fnmatch(str(prefix), pattern.rstrip("/")):
                return True
    return False


def lay_out(copies: list[Copy], into: Path, patterns: list[str]) -> None:
    """Copy the repository's files into `into` as the COPY lines would, minus what `patterns` drop."""
    for copy in copies:
        dest = into / copy.dest
        for source in copy.sources:
            src = REPO / source
            if src.is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / src.name)
                continue
            # A folder's contents go into dest (COPY gpuroute/ gpuroute/).
            for folder, dirs, files in os.walk(src):
                rel_folder = Path(folder).relative_to(REPO)
                dirs[:] = [d for d in dirs if not ignored(PurePosixPath(rel_folder, d), patterns)]
                for name in files:
                    if not ignored(PurePosixPath(rel_folder, name), patterns):
                        target = dest / Path(folder, name).relative_to(src)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(Path(folder, name), target)


def build_wheel(tree: Path, out: Path) -> Path:
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", "--wheel-dir", str(out), str(tree)],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def wheel_packages(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.removesuffix("/__init__.py").replace("/", ".") for name in archive.namelist()
                if name.endswith("/__init__.py")}


def source_packages(roots: tuple[Path, ...]) -> set[str]:
    """Every package under the given top-level package folders of the repository."""
    found: set[str] = set()
    for root in roots:
        for init in root.rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(root.parent).parts))
    return found


def as_copies(sources: frozenset[str]) -> list[Copy]:
    """COPY lines for a clone's layout: folders keep their place, files go to the root."""
    return [Copy((s,), s if s.endswith("/") else "./") for s in sorted(sources)]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_copies_only_the_shared_package_and_its_side(dockerfile: str) -> None:
    copies = dockerfile_copies(REPO / dockerfile)
    sources = {s for c in copies for s in c.sources}
    assert sources == IMAGES[dockerfile].sources
    for copy in copies:
        for source in copy.sources:
            top = PurePosixPath(source).parts[0]
            assert top not in DEV_ONLY and top != ".", f"{dockerfile} copies {source}"
            if source.endswith("/"):
                assert copy.dest == source, f"{dockerfile}: {source} keeps its place in the tree"


def test_dockerignore_keeps_development_code_out_and_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for folder in DEV_ONLY:
        assert ignored(PurePosixPath(folder), patterns), f".dockerignore lets {folder}/ into the build context"
    for layout in IMAGES.values():
        for source in layout.sources:
            assert not ignored(PurePosixPath(source.rstrip("/")), patterns), f".dockerignore drops {source}"
    # Compiled files and stale build metadata stay out of the images too.
    assert ignored(PurePosixPath("gpuroute/__pycache__/cli.cpython-311.pyc"), patterns)
    assert ignored(PurePosixPath("operator/gpuroute.egg-info/PKG-INFO"), patterns)


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_wheel_holds_exactly_its_packages(dockerfile: str, tmp_path: Path) -> None:
    tree = tmp_path / "build"
    lay_out(dockerfile_copies(REPO / dockerfile), tree, dockerignore_patterns())
    wheel = build_wheel(tree, tmp_path / "wheel")
    layout = IMAGES[dockerfile]
    packages = wheel_packages(wheel)
    assert packages == source_packages(layout.package_roots)
    assert not any(p.split(".")[0] in DEV_ONLY for p in packages)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert set(layout.data) <= names
    assert "gpuroute = gpuroute.cli:main" in entry_points

    # The image's `gpuroute demo` says in one line what it needs. Run with -S and no PYTHONPATH:
    # neither the project's editable install (a .pth hook) nor the checkout may lend the
    # image's packages the checkout's gpuroute_dev; site-packages only brings the dependencies.
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    probe = ("import importlib.util, sys; sys.path[:0] = sys.argv[1:]; import gpuroute; "
             "assert gpuroute.__file__.startswith(sys.argv[1]), gpuroute.__file__; "
             "assert importlib.util.find_spec('gpuroute_dev') is None; "
             "from gpuroute.cli import main; sys.exit(main(['demo']))")
    result = subprocess.run([sys.executable, "-S", "-c", probe, str(installed), *site.getsitepackages()],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == DEMO_NEEDS_CHECKOUT


def test_development_layout_still_installs_gpuroute_dev(tmp_path: Path) -> None:
    tree = tmp_path / "build"
    lay_out(as_copies(DEVELOPMENT.sources), tree, ["**/__pycache__", "**/*.egg-info"])
    wheel = build_wheel(tree, tmp_path / "wheel")
    assert wheel_packages(wheel) == source_packages(DEVELOPMENT.package_roots)
    with zipfile.ZipFile(wheel) as archive:
        assert set(DEVELOPMENT.data) <= set(archive.namelist())
