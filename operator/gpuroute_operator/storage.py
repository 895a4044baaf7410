"""Storage grants per namespace, and presigned URLs for workers.

A cluster admin grants a namespace storage prefixes with two annotations on the
Namespace object (comma- or whitespace-separated):

    gpuroute.io/storage-read:  s3://datasets/team-a/, https://images.example.com/
    gpuroute.io/storage-write: s3://results/team-a/

A job may read only from a granted read prefix and write only under a granted write
prefix; the operator presigns nothing else. Workers get short-lived URLs and never
hold storage credentials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute.protocol import CONTENT_TYPES
from gpuroute_operator.spec import JobSpec, SpecError, StorageURI

READ_ANNOTATION = "gpuroute.io/storage-read"
WRITE_ANNOTATION = "gpuroute.io/storage-write"


@dataclass(frozen=True)
class StorageGrants:
    """The prefixes one namespace may use."""

    read: tuple[str, ...] = ()
    """Prefixes inputs may come from (s3://, azure://, https://)."""
    write: tuple[str, ...] = ()
    """Prefixes outputs may go to (s3://, azure://)."""

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> StorageGrants:
        annotations = annotations or {}

        def split(key: str) -> tuple[str, ...]:
            return tuple(p for p in re.split(r"[\s,]+", annotations.get(key, "")) if p)

        return cls(split(READ_ANNOTATION), split(WRITE_ANNOTATION))

    @staticmethod
    def _allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
        # ".." could walk out of a granted prefix in storages that normalize keys.
        return "/../" not in uri and any(uri.startswith(p) for p in prefixes)

    def check(self, spec: JobSpec, namespace: str) -> None:
        """Raise SpecError (reason StorageNotGranted) if the job leaves its grants."""
        source = spec.input_uri.uri if spec.input_uri else spec.input_url
        if source is not None and not self._allowed(source, self.read):
            raise SpecError("spec.input.uri", f"{source} is outside the read prefixes granted to namespace "
                            f"{namespace!r} ({READ_ANNOTATION}: {', '.join(self.read) or 'none'})", "StorageNotGranted")
        if not self._allowed(spec.output.uri, self.write):
            raise SpecError("spec.output.uri", f"{spec.output.uri} is outside the write prefixes granted to namespace "
                            f"{namespace!r} ({WRITE_ANNOTATION}: {', '.join(self.write) or 'none'})", "StorageNotGranted")


@dataclass(frozen=True)
class SignedURL:
    """A URL a worker can use without credentials."""

    url: str
    """The presigned or SAS URL."""
    headers: Mapping[str, str]
    """Headers the request must carry for the signature to hold."""


class Presigner:
    """Signs storage URIs for workers; one boto3 client, created lazily."""

    def __init__(self, *, expires_s: int = 3600, s3_client: Any | None = None) -> None:
        self.expires_s = expires_s
        self._s3 = s3_client

    def _s3_client(self) -> Any:
        if self._s3 is None:
            import boto3  # imported here: an operator without S3 jobs never needs it
            from botocore.config import Config

            # SigV4 with path-style addressing works for AWS and for S3-compatible endpoints.
            self._s3 = boto3.client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        return self._s3

    def warm(self) -> None:
        """Create clients ahead of the first job: boto3 takes ~0.3 s, too long for the event loop."""
        self._s3_client()

    def get(self, uri: StorageURI, *, expires_s: int | None = None) -> SignedURL:
        if uri.scheme == "s3":
            url = self._s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": uri.container, "Key": uri.key}, ExpiresIn=expires_s or self.expires_s)
            return SignedURL(url, {})
        raise SpecError("spec.input.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")

    def put(self, uri: StorageURI, fmt: str, *, expires_s: int | None = None) -> SignedURL:
        content_type = CONTENT_TYPES[fmt]
        if uri.scheme == "s3":
            url = self._s3_client().generate_presigned_url(
                "put_object", Params={"Bucket": uri.container, "Key": uri.key, "ContentType": content_type},
                ExpiresIn=expires_s or self.expires_s)
            return SignedURL(url, {"Content-Type": content_type})
        raise SpecError("spec.output.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")
