"""The super-resolution models a worker serves: verified loading, architecture detection, caching.

Weights come only from the locations configured for the pool (a local path, or an
object-storage URI read through the `fetch` hook); nothing is ever downloaded from a
model hub. The file's bytes are hashed and compared with the configured SHA-256 before
torch.load sees them, and torch.load runs with weights_only=True, so a tampered or
swapped file is refused without being unpickled. Hashing and loading use the same bytes
in memory, so the file cannot change between the check and the load.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpuroute_worker.sr.rrdbnet import RRDBNet
from gpuroute_worker.sr.srvgg import SRVGGNetCompact

Fetch = Callable[[str], bytes]

_REMOTE = re.compile(r"^(s3|https?|azure|gs)://", re.IGNORECASE)
_BODY_INDEX = re.compile(r"^body\.(\d+)\.")


class UnknownModel(LookupError):
    """The pool serves no model of this name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown model {name!r}; this pool serves: {names}")
        self.name = name


class ModelLoadError(RuntimeError):
    """A configured model could not be read, verified or recognized."""


class ChecksumMismatch(ModelLoadError):
    """The weights file's SHA-256 is not the configured one."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"model {name!r}: weights sha256 is {actual}, expected {expected}; refusing to load")
        self.name = name
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live and the digest they must have."""

    path_or_uri: str
    """Local path (or file:// URI), or an object-storage URI read through `fetch`."""
    sha256: str
    """Hex SHA-256 of the weights file (an optional 'sha256:' prefix is accepted)."""


@dataclass(frozen=True)
class ArchSpec:
    """An architecture and the hyper-parameters read off a state dict."""

    arch: str
    """rrdbnet or srvgg."""
    scale: int
    """Native upscaling factor."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Constructor keyword arguments."""

    def build(self) -> nn.Module:
        if self.arch == "rrdbnet":
            return RRDBNet(**self.params)
        return SRVGGNetCompact(**self.params)


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    try:
        return tuple(state[key].shape)
    except KeyError as exc:
        raise ModelLoadError(f"state dict has no {key!r}") from exc


def detect_architecture(state: Mapping[str, torch.Tensor]) -> ArchSpec:
    """Recognize RRDBNet or SRVGGNetCompact and their sizes from parameter names and shapes."""
    if "conv_first.weight" in state:
        feat, in_ch = _shape(state, "conv_first.weight")[:2]
        out_ch = _shape(state, "conv_last.weight")[0]
        grow = _shape(state, "body.0.rdb1.conv1.weight")[0]
        blocks = 1 + max(int(m.group(1)) for k in state if (m := _BODY_INDEX.match(k)))
        # Scales 2 and 1 pixel-unshuffle the input by 2 and 4, multiplying its channels.
        by_ratio = {1: 4, 4: 2, 16: 1}
        ratio, rem = divmod(in_ch, out_ch)
        if rem or ratio not in by_ratio:
            raise ModelLoadError(f"RRDBNet with {in_ch} input channels for {out_ch} outputs is not x1, x2 or x4")
        scale = by_ratio[ratio]
        rrdb: dict[str, Any] = dict(
            num_in_ch=out_ch, num_out_ch=out_ch, scale=scale, num_feat=feat, num_block=blocks, num_grow_ch=grow
        )
        return ArchSpec("rrdbnet", scale, rrdb)

    if "body.0.weight" in state:
        convs = sorted(int(m.group(1)) for k, v in state.items() if (m := _BODY_INDEX.match(k)) and v.dim() == 4)
        feat, in_ch = _shape(state, "body.0.weight")[:2]
        last = convs[-1]
        if "body.1.weight" not in state:
            # relu and leakyrelu carry no parameters, so they cannot be told apart.
            raise ModelLoadError("SRVGGNetCompact without PReLU weights is not supported")
        num_conv, odd = divmod(last - 2, 2)
        if odd or num_conv < 0:
            raise ModelLoadError(f"SRVGGNetCompact body ends at index {last}, expected 2 + 2 * num_conv")
        out_channels = _shape(state, f"body.{last}.weight")[0]
        out_ch = in_ch
        upscale = round((out_channels / out_ch) ** 0.5)
        if upscale < 1 or out_ch * upscale * upscale != out_channels:
            raise ModelLoadError(f"SRVGGNetCompact last conv has {out_channels} channels, not {out_ch} * scale^2")
        params: dict[str, Any] = dict(
            num_in_ch=in_ch, num_out_ch=out_ch, num_feat=feat, num_conv=num_conv, upscale=upscale, act_type="prelu"
        )
        return ArchSpec("srvgg", upscale, params)

    raise ModelLoadError("state dict matches neither RRDBNet nor SRVGGNetCompact")


def unwrap_state_dict(loaded: Any) -> Mapping[str, torch.Tensor]:
    """Real-ESRGAN's .pth holds {'params_ema': sd} or {'params': sd}; plain state dicts too."""
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"weights file holds a {type(loaded).__name__}, not a state dict")
    for key in ("params_ema", "params"):
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError("weights file is not a state dict of tensors")
    return loaded


def _normalize_digest(digest: str) -> str:
    return digest.strip().lower().removeprefix("sha256:")


def _cache_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRegistry:
    """Named models, loaded once per (name, device, dtype) and kept in eval mode."""

    def __init__(self, sources: Mapping[str, ModelSource], *, fetch: Fetch | None = None) -> None:
        self._sources = dict(sources)
        self._fetch = fetch
        self._specs: dict[str, ArchSpec] = {}
        self._modules: dict[tuple[str, torch.device, torch.dtype], nn.Module] = {}
        # Loads happen on the GPU thread and shape queries on the event loop.
        self._lock = threading.RLock()

    def names(self) -> frozenset[str]:
        """The models this registry serves (for READY)."""
        return frozenset(self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def _source(self, name: str) -> ModelSource:
        try:
            return self._sources[name]
        except KeyError:
            raise UnknownModel(name, self._sources) from None

    def _read(self, name: str, source: ModelSource) -> bytes:
        location = source.path_or_uri
        if location.lower().startswith("file://"):
            location = location[len("file://") :]
        elif _REMOTE.match(location):
            if self._fetch is None:
                raise ModelLoadError(f"model {name!r}: {source.path_or_uri} is remote and no fetch hook is configured")
            try:
                return self._fetch(source.path_or_uri)
            except Exception as exc:  # any storage client's error; the cause is kept chained
                raise ModelLoadError(f"model {name!r}: cannot fetch {source.path_or_uri}: {exc}") from exc
        try:
            return Path(location).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"model {name!r}: cannot read {location}: {exc}") from exc

    def _state_dict(self, name: str) -> Mapping[str, torch.Tensor]:
        source = self._source(name)
        data = self._read(name, source)
        expected = _normalize_digest(source.sha256)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ChecksumMismatch(name, expected, actual)
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
            raise ModelLoadError(f"model {name!r}: cannot load weights: {exc}") from exc
        try:
            return unwrap_state_dict(loaded)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from exc

    @staticmethod
    def _detect(name: str, state: Mapping[str, torch.Tensor]) -> ArchSpec:
        try:
            return detect_architecture(state)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from exc

    def spec(self, name: str) -> ArchSpec:
        """Architecture and native scale of `name`; reads and verifies the weights the first time."""
        spec = self._specs.get(name)
        if spec is not None:
            # No lock once known: shape queries must not wait behind another model's load.
            return spec
        with self._lock:
            if name not in self._specs:
                self._specs[name] = self._detect(name, self._state_dict(name))
            return self._specs[name]

    def scale(self, name: str) -> int:
        """Native upscaling factor of `name`."""
        return self.spec(name).scale

    def prepare(self, names: Iterable[str] | None = None) -> None:
        """Verify and inspect models ahead of the first job, so shape queries never read files."""
        for name in self._sources if names is None else names:
            self.spec(name)

    def load(self, name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model on `device` in `dtype`, in eval mode; verified and cached."""
        key = (name, _cache_device(device), dtype)
        with self._lock:
            module = self._modules.get(key)
            if module is not None:
                return module
            state = self._state_dict(name)
            spec = self._specs.get(name) or self._detect(name, state)
            # Built without storage and given the loaded tensors, so no time goes into a
            # random initialization that the weights would overwrite.
            with torch.device("meta"):
                module = spec.build()
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:
                raise ModelLoadError(f"model {name!r}: weights do not fit the detected {spec.arch}: {exc}") from exc
            self._specs[name] = spec
            module = module.to(device=key[1], dtype=dtype).eval().requires_grad_(False)
            self._modules[key] = module
            return module

    def unload(self) -> None:
        """Drop every cached module (frees their device memory once no batch holds them)."""
        with self._lock:
            self._modules.clear()
