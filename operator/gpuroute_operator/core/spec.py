"""Parse and validate an ImageJob spec into an immutable JobSpec (pure, no I/O).

Every error names the field it is about (`spec.steps[2].radius: must be at most 50`),
because that message lands in the ImageJob's status for the user to read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute.fields import FieldError, int_in
from gpuroute.image_header import image_size
from gpuroute.ops_catalog import StepError, cost_class, normalize_steps
from gpuroute.protocol import CONTENT_TYPES

MAX_INLINE_BYTES = 256 * 1024
OUTPUT_FORMATS = tuple(CONTENT_TYPES)
PRIORITIES = ("realtime", "batch")
STRATEGIES = ("fastest", "cheapest", "balanced")
DEFAULT_TIMEOUT_S = 600
DEFAULT_MAX_ATTEMPTS = 3
MAX_PLACEMENT_NAMES = 32
"""Names one placement list (pools, clouds, regions) may hold, as crds/imagejob.yaml's maxItems.
Every routing pass looks at each name: without a bound one ImageJob could carry ~20,000."""
PLACEMENT_NAME_LENGTHS = {"pools": 253, "clouds": 63, "regions": 63}
"""Longest name in each placement list (a WorkerPool name is a DNS subdomain), as the CRD's maxLength."""

_S3 = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
_AZURE = re.compile(r"^azure://(?P<account>[a-z0-9]{3,24})/(?P<container>[a-z0-9](?:[a-z0-9\-]{1,61}[a-z0-9]))/(?P<blob>.+)$")


class SpecError(FieldError, ValueError):
    """A spec the operator cannot run; permanent: the job fails and is never retried."""

    def __init__(self, field: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(field, message)
        self.reason = reason
        """The Failed reason, e.g. InvalidSpec or StorageNotGranted."""


@dataclass(frozen=True)
class StorageURI:
    """A parsed s3:// or azure:// location."""

    scheme: str
    """s3 or azure."""
    container: str
    """S3 bucket, or Azure `account/container`."""
    key: str
    """Object key or blob name."""

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.container}/{self.key}"


def parse_storage_uri(uri: str, field: str) -> StorageURI:
    if match := _S3.match(uri):
        return StorageURI("s3", match["bucket"], match["key"])
    if match := _AZURE.match(uri):
        return StorageURI("azure", f"{match['account']}/{match['container']}", match["blob"])
    raise SpecError(field, f"{uri!r} is not s3://bucket/key or azure://account/container/blob")


@dataclass(frozen=True)
class Placement:
    """Hard filters and the routing strategy."""

    pools: tuple[str, ...] = ()
    """Allowed WorkerPool names; empty allows all."""
    clouds: tuple[str, ...] = ()
    """Allowed clouds; empty allows all."""
    regions: tuple[str, ...] = ()
    """Allowed regions; empty allows all (data residency)."""
    strategy: str = "balanced"
    """fastest, cheapest or balanced."""


@dataclass(frozen=True)
class JobSpec:
    """A validated ImageJob spec."""

    input_uri: StorageURI | None
    """Object-storage input, presigned for the worker."""
    input_url: str | None
    """User-supplied https:// input, fetched by the worker after the SSRF check."""
    inline: bytes | None
    """Decoded inline input, sent inside the JOB message."""
    output: StorageURI
    """Where the worker writes the result."""
    output_format: str
    """png, jpeg or webp."""
    quality: int
    """Encoder quality for jpeg and webp."""
    steps: tuple[dict[str, Any], ...]
    """Normalized pipeline, defaults filled."""
    priority: str
    """realtime or batch."""
    timeout_s: int
    """Seconds from admission until the job fails with Timeout."""
    max_attempts: int
    """Dispatch attempts before a retryable failure becomes final."""
    placement: Placement
    """Routing constraints."""
    cost_class: str = ""
    """Pipeline class the router learns pool speeds under (ops_catalog.cost_class)."""
    input_pixels: int | None = None
    """Pixels of an inline input, read from its header; None when the input is a URI."""
    background: str = "#ffffff"
    """spec.output.background: colour (#rrggbb) transparent pixels are composited onto for JPEG."""
    keep_metadata: bool = False
    """spec.output.keepMetadata: carry EXIF (orientation normalised) and the ICC profile."""
    items: tuple[tuple[StorageURI, StorageURI], ...] = ()
    """An item group's (input, output) pairs (batch items sent as one JOB); empty for one image."""
    item_timeout_s: int = 0
    """An item group's per-item timeout, enforced by the worker (0: none beyond timeout_s)."""


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(field, "must be a list of non-empty strings")
    return tuple(value)


def _placement_names(placement: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """spec.placement.<name>, within the CRD's bounds (a spec may arrive without its checks)."""
    field = f"spec.placement.{name}"
    names = _strings(placement.get(name), field)
    if len(names) > MAX_PLACEMENT_NAMES:
        raise SpecError(field, f"must hold at most {MAX_PLACEMENT_NAMES} names, got {len(names)}")
    longest = PLACEMENT_NAME_LENGTHS[name]
    for index, value in enumerate(names):
        if len(value) > longest:
            raise SpecError(field, f"[{index}] must be at most {longest} characters, got {len(value)}")
    return names


def _int_in(value: Any, field: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    if not int_in(value, lo, hi):
        raise SpecError(field, f"must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _choice(value: Any, field: str, default: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return default
    if value not in choices:
        raise SpecError(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


_BACKGROUND = re.compile(r"^#[0-9a-fA-F]{6}$")


def _background(value: Any) -> str:
    if value is None:
        return "#ffffff"
    if not isinstance(value, str) or not _BACKGROUND.match(value):
        raise SpecError("spec.output.background", f"must be a colour as #rrggbb, got {value!r}")
    return value.lower()


def _flag(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(field, f"must be true or false, got {value!r}")
    return value


def _parse_input(source: Any) -> tuple[StorageURI | None, str | None, bytes | None]:
    if not isinstance(source, Mapping):
        raise SpecError("spec.input", "is required: set `uri` or `inline`")
    uri, inline = source.get("uri"), source.get("inline")
    if (uri is None) == (inline is None):
        raise SpecError("spec.input", "set exactly one of `uri` and `inline`")
    if inline is not None:
        if not isinstance(inline, str):
            raise SpecError("spec.input.inline", "must be a base64 string")
        try:
            data = base64.b64decode(inline, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SpecError("spec.input.inline", "is not valid base64") from exc
        if len(data) > MAX_INLINE_BYTES:
            raise SpecError("spec.input.inline", f"decodes to {len(data)} bytes, limit is {MAX_INLINE_BYTES}", "InputTooLarge")
        if not data:
            raise SpecError("spec.input.inline", "is empty")
        return None, None, data
    if not isinstance(uri, str):
        raise SpecError("spec.input.uri", "must be a string")
    if uri.startswith("https://"):
        return None, uri, None
    return parse_storage_uri(uri, "spec.input.uri"), None, None


def parse_job_spec(spec: Mapping[str, Any] | None) -> JobSpec:
    """Validate a whole spec; raises SpecError naming the first bad field."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "is required")
    input_uri, input_url, inline = _parse_input(spec.get("input"))
    output = spec.get("output")
    if not isinstance(output, Mapping) or not isinstance(output.get("uri"), str):
        raise SpecError("spec.output.uri", "is required (s3://bucket/key or azure://account/container/blob)")
    try:
        steps = normalize_steps(spec.get("steps"))
    except StepError as exc:
        raise SpecError(exc.field, exc.message) from exc
    placement = spec.get("placement") or {}
    if not isinstance(placement, Mapping):
        raise SpecError("spec.placement", "must be an object")
    return JobSpec(
        input_uri=input_uri,
        input_url=input_url,
        inline=inline,
        output=parse_storage_uri(output["uri"], "spec.output.uri"),
        output_format=_choice(output.get("format"), "spec.output.format", "png", OUTPUT_FORMATS),
        quality=_int_in(output.get("quality"), "spec.output.quality", 90, 1, 100),
        steps=steps,
        priority=_choice(spec.get("priority"), "spec.priority", "batch", PRIORITIES),
        timeout_s=_int_in(spec.get("timeoutSeconds"), "spec.timeoutSeconds", DEFAULT_TIMEOUT_S, 1, 86400),
        max_attempts=_int_in(spec.get("maxAttempts"), "spec.maxAttempts", DEFAULT_MAX_ATTEMPTS, 1, 10),
        placement=Placement(
            pools=_placement_names(placement, "pools"),
            clouds=_placement_names(placement, "clouds"),
            regions=_placement_names(placement, "regions"),
            strategy=_choice(placement.get("strategy"), "spec.placement.strategy", "balanced", STRATEGIES),
        ),
        cost_class=cost_class(steps),
        input_pixels=_pixels(image_size(inline)) if inline is not None else None,
        background=_background(output.get("background")),
        keep_metadata=_flag(output.get("keepMetadata"), "spec.output.keepMetadata"),
    )


def _pixels(size: tuple[int, int] | None) -> int | None:
    return size[0] * size[1] if size else None


# ---- batches: one ImageJob, many images ------------------------------------------------------

DEFAULT_ITEM_TIMEOUT_S = 600
DEFAULT_MAX_ITEMS = 1_000_000
"""spec.input.maxItems when unset."""
MAX_ITEMS_CAP = 10_000_000
"""The most spec.input.maxItems may ask for: what one batch may cost the operator (about 16
bytes an item for a list object's inputs, and the results journal) stays bounded."""
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "avif": ".avif"}
"""File extension an item's output gets, by output format."""

_S3_PREFIX = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.*)$")
_AZURE_PREFIX = re.compile(r"^azure://(?P<account>[a-z0-9]{3,24})/(?P<container>[a-z0-9](?:[a-z0-9\-]{1,61}[a-z0-9]))/(?P<blob>.*)$")
_GLOB = re.compile(r"^[^/\s]{1,256}$")


@dataclass(frozen=True)
class BatchSpec:
    """A validated batch ImageJob: where its inputs come from and where their outputs go."""

    prefix: StorageURI | None
    """spec.input.prefix: every object under it is an input (key may be empty: the whole bucket)."""
    match: str | None
    """spec.input.match: glob on the key relative to the prefix (e.g. `*.jpg`); None matches all."""
    list_uri: StorageURI | None
    """spec.input.list: an object holding one input URI per line."""
    output_prefix: StorageURI
    """spec.output.prefix: item outputs, the results manifest and its journal go under it."""
    item: JobSpec
    """The spec every item runs (input and output are placeholders, replaced per item)."""
    timeout_s: int
    """spec.timeoutSeconds: bounds the whole batch, from admission."""
    item_timeout_s: int
    """spec.itemTimeoutSeconds: bounds each item's run on a worker."""
    max_items: int = DEFAULT_MAX_ITEMS
    """spec.input.maxItems: a listing past this many inputs fails the batch (TooManyItems)."""


def is_batch(spec: Mapping[str, Any] | None) -> bool:
    """A batch names `spec.input.prefix` or `spec.input.list` (checked before full validation)."""
    source = spec.get("input") if isinstance(spec, Mapping) else None
    return isinstance(source, Mapping) and ("prefix" in source or "list" in source)


def parse_storage_prefix(uri: Any, field: str) -> StorageURI:
    if not isinstance(uri, str):
        raise SpecError(field, "must be a string")
    if not uri.endswith("/"):
        raise SpecError(field, f"{uri!r} must end with '/' (a prefix names a folder of objects)")
    if match := _S3_PREFIX.match(uri):
        return StorageURI("s3", match["bucket"], match["key"])
    if match := _AZURE_PREFIX.match(uri):
        return StorageURI("azure", f"{match['account']}/{match['container']}", match["blob"])
    raise SpecError(field, f"{uri!r} is not s3://bucket/prefix/ or azure://account/container/prefix/")


def parse_batch_spec(spec: Mapping[str, Any] | None) -> BatchSpec:
    """Validate a batch spec; raises SpecError naming the first bad field."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "is required")
    source = spec.get("input")
    if not isinstance(source, Mapping):
        raise SpecError("spec.input", "is required")
    kinds = [k for k in ("uri", "inline", "prefix", "list") if source.get(k) is not None]
    if kinds not in (["prefix"], ["list"]):
        raise SpecError("spec.input", f"a batch sets exactly one of `prefix` and `list`, got {', '.join(kinds) or 'none'}")
    prefix = list_uri = None
    match: str | None = None
    if "prefix" in kinds:
        prefix = parse_storage_prefix(source["prefix"], "spec.input.prefix")
        raw_match = source.get("match")
        if raw_match is not None and (not isinstance(raw_match, str) or not _GLOB.match(raw_match)):
            raise SpecError("spec.input.match", f"must be a glob without '/' or spaces such as *.jpg, got {raw_match!r}")
        match = raw_match
    else:
        if source.get("match") is not None:
            raise SpecError("spec.input.match", "applies to `prefix` only")
        if not isinstance(source["list"], str):
            raise SpecError("spec.input.list", "must be a string")
        list_uri = parse_storage_uri(source["list"], "spec.input.list")
    output = spec.get("output")
    if not isinstance(output, Mapping) or output.get("prefix") is None:
        raise SpecError("spec.output.prefix", "is required for a batch (s3://bucket/prefix/ or azure://account/container/prefix/)")
    if output.get("uri") is not None:
        raise SpecError("spec.output.uri", "a batch sets `spec.output.prefix` instead")
    output_prefix = parse_storage_prefix(output["prefix"], "spec.output.prefix")
    if prefix is not None and prefix.container == output_prefix.container and output_prefix.key.startswith(prefix.key):
        raise SpecError("spec.output.prefix", f"{output_prefix.uri} lies under spec.input.prefix {prefix.uri}: "
                        "outputs would become inputs")
    if prefix is not None and under_prefix(prefix, output_prefix):
        raise SpecError("spec.input.prefix", f"{prefix.uri} lies under spec.output.prefix {output_prefix.uri}: "
                        "outputs would overwrite the batch's own inputs")
    if list_uri is not None and under_prefix(list_uri, output_prefix):
        raise SpecError("spec.input.list", f"{list_uri.uri} lies under spec.output.prefix {output_prefix.uri}: "
                        "outputs could overwrite the list")
    max_items = _int_in(source.get("maxItems"), "spec.input.maxItems", DEFAULT_MAX_ITEMS, 1, MAX_ITEMS_CAP)
    timeout_s = _int_in(spec.get("timeoutSeconds"), "spec.timeoutSeconds", DEFAULT_TIMEOUT_S, 1, 86400)
    item_timeout_s = _int_in(spec.get("itemTimeoutSeconds"), "spec.itemTimeoutSeconds",
                             min(DEFAULT_ITEM_TIMEOUT_S, timeout_s), 1, 86400)
    # The item template goes through the single-image parser, so steps, format, placement
    # and limits are validated by exactly the same rules.
    base = prefix if prefix is not None else list_uri
    assert base is not None  # one of the two was parsed above
    batch_only = ("input", "output", "timeoutSeconds", "itemTimeoutSeconds")
    template = {key: value for key, value in spec.items() if key not in batch_only}
    item = parse_job_spec({**template, "input": {"uri": f"{base.scheme}://{base.container}/item"},
                           "output": {**{k: v for k, v in output.items() if k != "prefix"},
                                      "uri": f"{output_prefix.scheme}://{output_prefix.container}/item"},
                           "timeoutSeconds": item_timeout_s})
    return BatchSpec(prefix, match, list_uri, output_prefix, item, timeout_s, item_timeout_s, max_items)


def under_prefix(uri: StorageURI, prefix: StorageURI) -> bool:
    """`uri` (an object or a prefix) lies under `prefix`, in the same bucket or container."""
    return uri.scheme == prefix.scheme and uri.container == prefix.container and uri.key.startswith(prefix.key)


def item_output(batch: BatchSpec, source: StorageURI) -> StorageURI:
    """Where an item's output goes: its input key relative to the input prefix (for a list, the
    whole key), under the output prefix, with the output format's extension."""
    relative = source.key
    if batch.prefix is not None and source.key.startswith(batch.prefix.key):
        relative = source.key[len(batch.prefix.key):]
    folder, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    key = f"{batch.output_prefix.key}{folder + '/' if folder else ''}{stem}{EXTENSIONS[batch.item.output_format]}"
    return StorageURI(batch.output_prefix.scheme, batch.output_prefix.container, key)
