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

import datetime as dt
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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


@dataclass(frozen=True)
class AzureAccount:
    """An Azure storage account the operator may sign URLs for."""

    name: str
    """Storage account name, as in azure://NAME/container/blob."""
    endpoint: str = ""
    """Blob endpoint; empty means https://NAME.blob.core.windows.net."""
    key: str | None = None
    """Account key (from a Secret); None signs with a user delegation key from azure-identity."""

    @property
    def blob_endpoint(self) -> str:
        return (self.endpoint or f"https://{self.name}.blob.core.windows.net").rstrip("/")


DELEGATION_KEY_LIFETIME = dt.timedelta(hours=6)
"""User delegation keys are requested for this long (Azure allows up to 7 days)."""
DELEGATION_KEY_RENEW_BEFORE = dt.timedelta(hours=2)
"""A delegation key is replaced this long before it expires, leaving room for SAS expiries."""


class Presigner:
    """Signs storage URIs for workers; clients are created lazily.

    Azure user delegation keys are fetched by `warm()` and `refresh()`, which the engine
    runs in threads; get/put only sign with keys already held, so they never block.
    """

    def __init__(self, *, expires_s: int = 3600, s3_client: Any | None = None,
                 azure_accounts: Sequence[AzureAccount] = (), azure_credential: Any | None = None) -> None:
        self.expires_s = expires_s
        self._s3 = s3_client
        self._azure = {a.name: a for a in azure_accounts}
        self._azure_credential = azure_credential
        self._delegation: dict[str, Any] = {}
        self._lock = threading.Lock()

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
        self.refresh()

    def refresh(self) -> None:
        """Fetch or renew Azure user delegation keys that are missing or close to expiry (blocking)."""
        now = dt.datetime.now(dt.UTC)
        for account in self._azure.values():
            if account.key is not None:
                continue
            held = self._delegation.get(account.name)
            if held is not None and _parse_time(held.signed_expiry) - now > DELEGATION_KEY_RENEW_BEFORE:
                continue
            from azure.storage.blob import BlobServiceClient

            if self._azure_credential is None:
                from azure.identity import DefaultAzureCredential

                self._azure_credential = DefaultAzureCredential()
            service = BlobServiceClient(account.blob_endpoint, credential=self._azure_credential)
            key = service.get_user_delegation_key(now - dt.timedelta(minutes=5), now + DELEGATION_KEY_LIFETIME)
            with self._lock:
                self._delegation[account.name] = key

    def _azure_sas(self, uri: StorageURI, field: str, *, write: bool, expires_s: int) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        account_name, container = uri.container.split("/", 1)
        account = self._azure.get(account_name)
        if account is None:
            raise SpecError(field, f"storage account {account_name!r} is not configured on the operator", "StorageUnavailable")
        now = dt.datetime.now(dt.UTC)
        permission = BlobSasPermissions(create=True, write=True) if write else BlobSasPermissions(read=True)
        signing: dict[str, Any] = {"account_key": account.key} if account.key else {}
        if not account.key:
            with self._lock:
                key = self._delegation.get(account_name)
            if key is None:
                raise SpecError(field, f"no user delegation key for storage account {account_name!r} yet", "StorageUnavailable")
            signing = {"user_delegation_key": key}
        sas = generate_blob_sas(account_name, container, uri.key, permission=permission,
                                start=now - dt.timedelta(minutes=5), expiry=now + dt.timedelta(seconds=expires_s), **signing)
        return f"{account.blob_endpoint}/{container}/{quote(uri.key)}?{sas}"

    def get(self, uri: StorageURI, *, expires_s: int | None = None) -> SignedURL:
        if uri.scheme == "s3":
            url = self._s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": uri.container, "Key": uri.key}, ExpiresIn=expires_s or self.expires_s)
            return SignedURL(url, {})
        if uri.scheme == "azure":
            return SignedURL(self._azure_sas(uri, "spec.input.uri", write=False, expires_s=expires_s or self.expires_s), {})
        raise SpecError("spec.input.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")

    def put(self, uri: StorageURI, fmt: str, *, expires_s: int | None = None) -> SignedURL:
        content_type = CONTENT_TYPES[fmt]
        if uri.scheme == "s3":
            url = self._s3_client().generate_presigned_url(
                "put_object", Params={"Bucket": uri.container, "Key": uri.key, "ContentType": content_type},
                ExpiresIn=expires_s or self.expires_s)
            return SignedURL(url, {"Content-Type": content_type})
        if uri.scheme == "azure":
            url = self._azure_sas(uri, "spec.output.uri", write=True, expires_s=expires_s or self.expires_s)
            # Blob PUTs must say which kind of blob they create.
            return SignedURL(url, {"Content-Type": content_type, "x-ms-blob-type": "BlockBlob"})
        raise SpecError("spec.output.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
