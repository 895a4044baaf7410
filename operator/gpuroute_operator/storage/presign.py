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
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gpuroute.protocol import CONTENT_TYPES
from gpuroute_operator.core.errors import SigningUnavailable
from gpuroute_operator.core.spec import SpecError, StorageURI
from gpuroute_operator.storage import sigv4

log = logging.getLogger(__name__)


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
    """Blob endpoint; empty means https://NAME.blob.core.windows.net (Azurite: http://HOST:PORT/NAME)."""
    key: str | None = field(default=None, repr=False)
    """Account key (from a Secret); None signs with a user delegation key from azure-identity."""

    @property
    def blob_endpoint(self) -> str:
        return (self.endpoint or f"https://{self.name}.blob.core.windows.net").rstrip("/")


DELEGATION_KEY_LIFETIME = dt.timedelta(hours=48)
"""User delegation keys are requested for this long (Azure allows up to 7 days)."""
DELEGATION_KEY_RENEW_BEFORE = dt.timedelta(hours=25)
"""A key is replaced once it has less than this left: a SAS cannot outlive its key, and a job's
SAS may need up to timeoutSeconds (at most 24 h) plus a minute."""
DELEGATION_RETRY_S = 30.0
"""After a failed fetch, the renewal thread tries again this soon."""
S3_CLIENT_RETRY_S = 10.0
"""While S3 signing fails, a fresh client (which re-reads the credential chain) is built this often."""

_CLOCK_SKEW = dt.timedelta(minutes=5)


class Presigner:
    """Signs storage URIs for workers; clients are created lazily.

    get/put run on the engine's event loop and never block: they sign with what is
    already held (an account key, or a cached Azure user delegation key), and raise
    SigningUnavailable when that is missing (the S3 client is then rebuilt in a thread). Delegation keys
    are fetched by `warm()`, which the engine runs in a thread at startup, and renewed
    before expiry by a daemon thread that `warm()` starts when an account needs them; the
    engine need not call anything else. `refresh()` only wakes that thread, so calling it
    from the event loop is harmless; `renew_keys()` is the blocking fetch itself.
    """

    def __init__(self, *, expires_s: int = 3600, s3_client: Any | None = None,
                 azure_accounts: Sequence[AzureAccount] = (), azure_credential: Any | None = None,
                 key_lifetime: dt.timedelta = DELEGATION_KEY_LIFETIME,
                 renew_before: dt.timedelta = DELEGATION_KEY_RENEW_BEFORE) -> None:
        self.expires_s = expires_s
        self._s3 = s3_client
        self._s3_given = s3_client is not None
        self._s3_rebuilt_at = float("-inf")
        self._s3_rebuilding = False
        self._azure = {a.name: a for a in azure_accounts}
        # Created lazily: DefaultAzureCredential probes its chain, and only delegation accounts need it.
        self._azure_credential = azure_credential
        self._key_lifetime = key_lifetime
        self._renew_before = renew_before
        self._delegation: dict[str, Any] = {}
        self._delegation_errors: dict[str, str] = {}
        self._lock = threading.Lock()  # guards the two dicts above (event loop vs renewal thread)
        self._renew_lock = threading.Lock()  # one fetch at a time
        self._wake = threading.Event()
        self._closed = False
        self._renewer: threading.Thread | None = None
        self._templates = sigv4.Templates()
        """Where botocore sends each kind of S3 request, learned from its URLs: signed without it."""

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = _new_s3_client()
        return self._s3

    def s3_client(self) -> Any:
        """The operator's own S3 client, for batch listings and manifests (blocking: call it in a thread)."""
        return self._s3_client()

    def azure_container(self, uri: StorageURI) -> Any:
        """A ContainerClient for `uri`'s container, signed in as the operator (blocking: use it in a thread)."""
        from azure.storage.blob import ContainerClient

        account_name, container = uri.container.split("/", 1)
        account = self._azure.get(account_name)
        if account is None:
            raise SpecError("spec.input", f"storage account {account_name!r} is not configured on the operator",
                            "StorageUnavailable")
        credential: Any = {"account_name": account.name, "account_key": account.key} if account.key else None
        if credential is None:
            if self._azure_credential is None:
                from azure.identity import DefaultAzureCredential

                self._azure_credential = DefaultAzureCredential()
            credential = self._azure_credential
        return ContainerClient(account.blob_endpoint, container, credential=credential)

    def _rebuild_s3_soon(self) -> None:
        """Re-read the credential chain in a thread (it may probe a metadata service for seconds):
        credentials that appear later (an IRSA token mounted late) are picked up without a restart."""
        now = time.monotonic()
        if self._s3_given or self._s3_rebuilding or now - self._s3_rebuilt_at < S3_CLIENT_RETRY_S:
            return
        self._s3_rebuilt_at, self._s3_rebuilding = now, True

        def rebuild() -> None:
            from botocore.exceptions import BotoCoreError

            try:
                self._s3 = _new_s3_client()  # a reference swap: the event loop sees old or new
            except BotoCoreError:
                log.exception("could not create an S3 client")
            finally:
                self._s3_rebuilding = False

        threading.Thread(target=rebuild, name="s3-client", daemon=True).start()

    @property
    def _delegated_accounts(self) -> list[AzureAccount]:
        return [a for a in self._azure.values() if a.key is None]

    def warm(self) -> None:
        """Create clients and fetch delegation keys ahead of the first job (blocking: run in a thread).

        boto3 takes ~0.3 s and importing azure.storage.blob about as long: too long for the
        event loop. A delegation key that cannot be fetched now is logged and retried by
        the renewal thread; jobs for that account wait (StorageUnavailable) meanwhile.
        """
        self._s3_client()
        if not self._azure:
            return
        import azure.storage.blob  # noqa: F401 (the import get/put would otherwise pay on the loop)

        if self._delegated_accounts:
            self.renew_keys()
            if self._renewer is None and not self._closed:
                self._renewer = threading.Thread(target=self._renew_loop, name="gpuroute-azure-keys", daemon=True)
                self._renewer.start()

    def refresh(self) -> None:
        """Ask the renewal thread to check the delegation keys now; returns at once."""
        self._wake.set()

    def close(self) -> None:
        """Stop the renewal thread (the process exiting stops it too: it is a daemon)."""
        self._closed = True
        self._wake.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(5)

    def _renew_loop(self) -> None:
        while True:
            self._wake.wait(self._next_renewal_s())
            self._wake.clear()
            if self._closed:
                return
            try:
                self.renew_keys()
            except Exception:  # a dead renewal thread would let every key expire unnoticed: log, keep going
                log.exception("renewing Azure user delegation keys failed")

    def _next_renewal_s(self) -> float:
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            held = [self._delegation.get(a.name) for a in self._delegated_accounts]
        keys = [key for key in held if key is not None]
        if len(keys) < len(held):
            return DELEGATION_RETRY_S
        due = min(_parse_time(key.signed_expiry) - self._renew_before for key in keys)
        # Woken at least hourly: a clock jump or a suspended VM must not skip a renewal.
        return min(3600.0, max(DELEGATION_RETRY_S, (due - now).total_seconds()))

    def renew_keys(self) -> None:
        """Fetch delegation keys that are missing or close to expiry (blocking).

        A failure is logged and kept for the StorageUnavailable message; the key held
        before, if any, stays in use until it expires.
        """
        from azure.core.exceptions import AzureError  # covers azure-identity's errors too

        with self._renew_lock:
            for account in self._delegated_accounts:
                now = dt.datetime.now(dt.UTC)
                with self._lock:
                    held = self._delegation.get(account.name)
                if held is not None and _parse_time(held.signed_expiry) - now > self._renew_before:
                    continue
                try:
                    key = self._fetch_delegation_key(account, now)
                except AzureError as exc:
                    message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log.warning("no user delegation key for Azure storage account %s: %s", account.name, message)
                    with self._lock:
                        self._delegation_errors[account.name] = message
                    continue
                with self._lock:
                    self._delegation[account.name] = key
                    self._delegation_errors.pop(account.name, None)
                log.info("user delegation key for Azure storage account %s valid until %s", account.name,
                         key.signed_expiry)

    def _fetch_delegation_key(self, account: AzureAccount, now: dt.datetime) -> Any:
        from azure.storage.blob import BlobServiceClient

        if self._azure_credential is None:
            from azure.identity import DefaultAzureCredential

            # The chain AKS workload identity uses (AZURE_FEDERATED_TOKEN_FILE), then managed identity.
            self._azure_credential = DefaultAzureCredential()
        # Few, short retries: the renewal thread is the retry loop, and a failure should be
        # reported in seconds, not after the storage SDK's default minute of backoff.
        with BlobServiceClient(account.blob_endpoint, credential=self._azure_credential, retry_total=2,
                               initial_backoff=1, increment_base=2) as service:
            return service.get_user_delegation_key(now - _CLOCK_SKEW, now + self._key_lifetime)

    def _azure_sas(self, uri: StorageURI, field_name: str, *, write: bool, expires_s: int) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        account_name, container = uri.container.split("/", 1)
        account = self._azure.get(account_name)
        if account is None:
            raise SpecError(field_name, f"storage account {account_name!r} is not configured on the operator",
                            "StorageUnavailable")
        now = dt.datetime.now(dt.UTC)
        expiry = now + dt.timedelta(seconds=expires_s)
        permission = BlobSasPermissions(create=True, write=True) if write else BlobSasPermissions(read=True)
        signing: dict[str, Any]
        if account.key is not None:
            signing = {"account_key": account.key}
        else:
            with self._lock:
                key = self._delegation.get(account_name)
                error = self._delegation_errors.get(account_name)
            if key is None or _parse_time(key.signed_expiry) <= now:
                raise SigningUnavailable(field_name, f"no user delegation key for storage account {account_name!r}"
                                         f"{f' ({error})' if error else ' yet'}")
            # A SAS is void past its key's expiry; renewal keeps that a day or more ahead.
            expiry = min(expiry, _parse_time(key.signed_expiry))
            signing = {"user_delegation_key": key}
        # spr=https where the account is served over TLS: the URL is then useless in clear text.
        protocol = "https" if account.blob_endpoint.startswith("https://") else None
        sas = generate_blob_sas(account_name, container, uri.key, permission=permission,
                                start=now - _CLOCK_SKEW, expiry=expiry, protocol=protocol, **signing)
        return f"{account.blob_endpoint}/{container}/{quote(uri.key)}?{sas}"

    def _s3_presign(self, field_name: str, method: str, params: dict[str, str], expires_s: int) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._s3_client()
        method_name = "PUT" if method == "put_object" else "GET"
        headers = {"Content-Type": params["ContentType"]} if "ContentType" in params else None
        slot = (params["Bucket"], method_name, params.get("ContentType", ""))
        credentials = _frozen_credentials(client)
        if credentials is not None:
            fast = self._templates.sign(client, slot, params["Key"], credentials=credentials, expires_s=expires_s,
                                        headers=headers, epoch_s=time.time())
            if fast is not None:
                return fast
        try:
            url = str(client.generate_presigned_url(method, Params=params, ExpiresIn=expires_s))
        except (BotoCoreError, ClientError) as exc:
            # No credentials yet (an IRSA token not mounted, a metadata service hiccup): signing is
            # local once they exist, so the job waits for them.
            self._rebuild_s3_soon()
            raise SigningUnavailable(field_name, f"cannot sign for S3: {exc}") from exc
        if credentials is not None:
            self._templates.offer(client, slot, url, params["Key"], credentials=credentials, expires_s=expires_s,
                                  headers=headers, now=time.monotonic())
        return url

    def get(self, uri: StorageURI, *, expires_s: int | None = None) -> SignedURL:
        if uri.scheme == "s3":
            url = self._s3_presign("spec.input.uri", "get_object", {"Bucket": uri.container, "Key": uri.key},
                                   expires_s or self.expires_s)
            return SignedURL(url, {})
        if uri.scheme == "azure":
            return SignedURL(self._azure_sas(uri, "spec.input.uri", write=False, expires_s=expires_s or self.expires_s), {})
        raise SpecError("spec.input.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")

    def put(self, uri: StorageURI, fmt: str, *, expires_s: int | None = None) -> SignedURL:
        content_type = CONTENT_TYPES[fmt]
        if uri.scheme == "s3":
            url = self._s3_presign("spec.output.uri", "put_object",
                                   {"Bucket": uri.container, "Key": uri.key, "ContentType": content_type},
                                   expires_s or self.expires_s)
            return SignedURL(url, {"Content-Type": content_type})
        if uri.scheme == "azure":
            url = self._azure_sas(uri, "spec.output.uri", write=True, expires_s=expires_s or self.expires_s)
            # Blob PUTs must say which kind of blob they create.
            return SignedURL(url, {"Content-Type": content_type, "x-ms-blob-type": "BlockBlob"})
        raise SpecError("spec.output.uri", f"no credentials configured for {uri.scheme}:// storage", "StorageUnavailable")


def _new_s3_client() -> Any:
    import boto3  # imported here: an operator without S3 jobs never needs it
    from botocore.config import Config

    # A session of its own: boto3's default session would keep credentials from before.
    # SigV4 with path-style addressing works for AWS and for S3-compatible endpoints.
    return boto3.session.Session().client(
        "s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _frozen_credentials(client: Any) -> sigv4.Credentials | None:
    """The credentials `client` signs with now (refreshed by botocore when they are about to
    expire), or None when it has none: then botocore signs, and says what is missing."""
    from botocore.exceptions import BotoCoreError

    getter = getattr(client, "_get_credentials", None)  # absent on a client that is not botocore's
    try:
        held = getter() if getter is not None else None
        frozen = held.get_frozen_credentials() if held is not None else None
    except BotoCoreError:
        return None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        return None
    return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
