"""A batch's object-storage I/O: listing its inputs page by page, and its results journal.

Every call here blocks (boto3, azure-storage-blob) and is made from a thread by the
batch shell (runner.py). Nothing here holds image bytes: listings return keys, and the
only objects read or written are the input list and the manifest text. Neither is ever
held whole: objects are read in chunks and split into lines of bounded length (the list
object and the journal sit in the tenant's own storage, so their size is the tenant's
choice), and the results manifest is written in parts (S3 multipart upload, Azure blocks).
"""

from __future__ import annotations

import base64
import fnmatch
import http
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote_plus

from gpuroute.redact import redact
from gpuroute_operator.core.spec import SpecError, StorageURI, parse_storage_uri
from gpuroute_operator.storage.presign import Presigner

PAGE_SIZE = 1000
"""Keys per listing page (S3's maximum)."""

LIST_URL_EXPIRES_S = 900
"""Lifetime of the presigned URL one S3 listing page is fetched with. It is used at once and
never leaves the process; 15 minutes tolerates the clock skew header-signed requests do."""
LIST_ATTEMPTS = 4
"""Tries per S3 listing page on a connection error, a 5xx or throttling (botocore's own
retries do not apply to a presigned request)."""
LIST_RETRY_BASE_S = 0.5
"""First backoff before retrying a listing page; doubled per retry, with full jitter."""

READ_CHUNK_BYTES = 256 * 1024
"""An object (list, journal part) is read this much at a time."""
MAX_LIST_LINE_BYTES = 64 * 1024
"""A list object's line longer than this is no storage URI (S3 keys are at most 1,024 bytes):
that item fails alone, and its bytes are dropped as they stream by, never held."""
MAX_JOURNAL_LINE_BYTES = 1024 * 1024
"""No journal line the operator writes comes near this; a longer one means the journal was
overwritten by someone else, and the batch fails (JournalCorrupt) rather than trusting it."""
MANIFEST_PART_BYTES = 5 * 1024 * 1024
"""The results manifest is uploaded in parts of at least this size (S3's minimum part)."""

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                          "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                          "PriorRequestNotComplete"})
"""S3 error codes botocore's standard retry mode treats as transient or throttling."""


class StorageIOError(RuntimeError):
    """Listing or manifest I/O failed (network, permissions, a missing object)."""


class JournalCorrupt(RuntimeError):
    """A journal part holds a line no operator wrote."""


class S3ListingError(RuntimeError):
    """A ListObjectsV2 request failed without an S3 error to report (connection, TLS, timeout, a
    body that is no listing). The presigned URL's credentials are redacted from the message."""


def _wrap(uri: StorageURI, exc: Exception) -> StorageIOError:
    return StorageIOError(f"{uri.uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


class BatchStore:
    """Listing and manifest I/O against the operator's own storage credentials."""

    def __init__(self, presigner: Presigner) -> None:
        self._presigner = presigner

    # ---- listing ----------------------------------------------------------------------

    def list_prefix(self, prefix: StorageURI, match: str | None, *,
                    page_size: int = PAGE_SIZE) -> Iterator[list[StorageURI | SpecError]]:
        """Objects under `prefix` whose relative key matches `match`, one page at a time."""
        for page in self._list_keys(prefix, page_size):
            keys = [k for k in page if not k.endswith("/") and "/_gpuroute/" not in f"/{k[len(prefix.key):]}"]
            if match:
                keys = [k for k in keys if fnmatch.fnmatchcase(k[len(prefix.key):].rsplit("/", 1)[-1], match)]
            yield [StorageURI(prefix.scheme, prefix.container, k) for k in keys]

    def list_file(self, uri: StorageURI, *, page_size: int = PAGE_SIZE) -> Iterator[list[StorageURI | SpecError]]:
        """The URIs in a list object, one per line (blank lines and #comments skipped); a line
        that is no storage URI comes back as a SpecError for that item alone."""
        page: list[StorageURI | SpecError] = []
        for number, line in enumerate(self._read_lines(uri, MAX_LIST_LINE_BYTES), start=1):
            if line is None:
                page.append(SpecError(f"spec.input.list line {number}",
                                      f"is longer than {MAX_LIST_LINE_BYTES} bytes: no storage URI"))
            elif (text := line.strip()) and not text.startswith("#"):
                try:
                    page.append(parse_storage_uri(text, f"spec.input.list line {number}"))
                except SpecError as exc:
                    page.append(exc)
            if len(page) >= page_size:
                yield page
                page = []
        if page:
            yield page

    def _list_keys(self, prefix: StorageURI, page_size: int) -> Iterator[list[str]]:
        try:
            if prefix.scheme == "s3":
                yield from _list_s3(self._presigner.s3_client(), prefix, page_size)
            else:
                container = self._presigner.azure_container(prefix)
                with container:
                    for blobs in container.list_blobs(name_starts_with=prefix.key or None,
                                                      results_per_page=page_size).by_page():
                        yield [blob.name for blob in blobs]
        except SpecError:
            raise
        except Exception as exc:  # boto3 and azure raise many unrelated types; the batch reports any
            raise _wrap(prefix, exc) from exc

    def _read_lines(self, uri: StorageURI, limit: int) -> Iterator[str | None]:
        """The object's lines, read in chunks; None for a line longer than `limit` bytes."""
        try:
            if uri.scheme == "s3":
                body = self._presigner.s3_client().get_object(Bucket=uri.container, Key=uri.key)["Body"]
                try:
                    yield from _decoded(split_lines(body.iter_chunks(READ_CHUNK_BYTES), limit))
                finally:
                    body.close()
            else:
                container = self._presigner.azure_container(uri)
                with container:
                    chunks = container.download_blob(uri.key, max_concurrency=1).chunks()
                    yield from _decoded(split_lines(chunks, limit))
        except SpecError:
            raise
        except Exception as exc:  # see _list_keys
            raise _wrap(uri, exc) from exc

    # ---- journal and manifest ---------------------------------------------------------------

    def read_journal(self, prefix: StorageURI, *, strict: bool = True) -> Iterator[str]:
        """Every line of every journal part under `prefix`, parts in order. A line longer than
        any the operator writes raises JournalCorrupt, or is left out when not `strict`."""
        for page in self._list_keys(prefix, PAGE_SIZE):
            for key in sorted(page):
                part = StorageURI(prefix.scheme, prefix.container, key)
                for line in self._read_lines(part, MAX_JOURNAL_LINE_BYTES):
                    if line is not None:
                        yield line
                    elif strict:
                        raise JournalCorrupt(f"{part.uri} holds a line longer than {MAX_JOURNAL_LINE_BYTES} bytes, "
                                             "which no operator writes: the journal was overwritten")

    def journal_parts(self, prefix: StorageURI) -> int:
        """How many parts the journal has (the next part is numbered one more)."""
        return sum(len(page) for page in self._list_keys(prefix, PAGE_SIZE))

    def write(self, uri: StorageURI, text: str) -> None:
        data = text.encode()
        try:
            if uri.scheme == "s3":
                self._presigner.s3_client().put_object(Bucket=uri.container, Key=uri.key, Body=data,
                                                       ContentType="application/x-ndjson")
            else:
                container = self._presigner.azure_container(uri)
                with container:
                    container.upload_blob(uri.key, data, overwrite=True)
        except SpecError:
            raise
        except Exception as exc:  # see _list_keys
            raise _wrap(uri, exc) from exc

    def write_manifest(self, journal: StorageURI, target: StorageURI, *,
                       part_bytes: int = MANIFEST_PART_BYTES) -> None:
        """Concatenate the journal's parts into the results manifest (one object), streamed:
        at most about `part_bytes` of it is held at once."""
        upload: _PartUpload | None = None
        buffer = bytearray()
        try:
            for line in self.read_journal(journal, strict=False):
                if line.strip():
                    buffer += line.encode()
                    buffer += b"\n"
                if len(buffer) >= part_bytes:
                    if upload is None:
                        upload = self._part_upload(target)
                    upload.add(bytes(buffer))
                    del buffer[:]
            if upload is None:
                self.write(target, buffer.decode())
                return
            if buffer:
                upload.add(bytes(buffer))
            upload.commit()
        except Exception as exc:
            if upload is not None:
                upload.abort()
            if isinstance(exc, (StorageIOError, SpecError)):
                raise
            raise _wrap(target, exc) from exc

    def _part_upload(self, target: StorageURI) -> _PartUpload:
        if target.scheme == "s3":
            return _S3Parts(self._presigner.s3_client(), target)
        return _AzureBlocks(self._presigner.azure_container(target), target)


class _PartUpload:
    """One object written in parts, committed at the end or aborted."""

    def add(self, data: bytes) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _S3Parts(_PartUpload):
    def __init__(self, client: Any, target: StorageURI) -> None:
        self._client, self._target = client, target
        self._id = client.create_multipart_upload(Bucket=target.container, Key=target.key,
                                                  ContentType="application/x-ndjson")["UploadId"]
        self._parts: list[dict[str, Any]] = []

    def add(self, data: bytes) -> None:
        number = len(self._parts) + 1
        answer = self._client.upload_part(Bucket=self._target.container, Key=self._target.key, UploadId=self._id,
                                          PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def commit(self) -> None:
        self._client.complete_multipart_upload(Bucket=self._target.container, Key=self._target.key, UploadId=self._id,
                                               MultipartUpload={"Parts": self._parts})

    def abort(self) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._target.container, Key=self._target.key,
                                                UploadId=self._id)
        except Exception:  # the store's own lifecycle rules drop an upload left incomplete
            pass


class _AzureBlocks(_PartUpload):
    def __init__(self, container: Any, target: StorageURI) -> None:
        self._container = container
        self._blob = container.get_blob_client(target.key)
        self._blocks: list[str] = []

    def add(self, data: bytes) -> None:
        # Block ids of one blob must all have the same length.
        block = base64.b64encode(f"gpuroute-{len(self._blocks):08d}".encode()).decode()
        self._blob.stage_block(block, data)
        self._blocks.append(block)

    def commit(self) -> None:
        from azure.storage.blob import BlobBlock

        try:
            self._blob.commit_block_list([BlobBlock(block_id=block) for block in self._blocks])
        finally:
            self._container.close()

    def abort(self) -> None:
        self._container.close()  # staged blocks that are never committed expire after a week


def split_lines(chunks: Iterable[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of a byte stream, without their `\n` (or `\r\n`); None for a line longer than
    `limit` bytes, whose bytes are dropped as they come rather than held."""
    held = bytearray()
    overlong = False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not overlong:
                held += chunk[start:end]
            yield None if overlong or len(held) > limit + 1 else _line(held)
            held.clear()
            overlong = False
            start = end + 1
        if not overlong:
            held += chunk[start:]
            if len(held) > limit + 1:  # + 1: the `\r` of a `\r\n` is no part of the line
                overlong = True
                held.clear()
    if overlong:
        yield None
    elif held:
        yield _line(held)


def _line(held: bytearray) -> bytes:
    return bytes(held[:-1] if held.endswith(b"\r") else held)


def _decoded(lines: Iterator[bytes | None]) -> Iterator[str | None]:
    for line in lines:
        yield None if line is None else line.decode("utf-8", errors="replace")


# ---- S3 listing -------------------------------------------------------------------------
#
# botocore's list_objects_v2 costs some 50 us of CPU per key (a dict per <Contents>,
# dateutil for every LastModified, the whole body parsed a second time looking for a 200
# error), more than the operator spends on the rest of an item, and a listing needs keys only.
# So botocore still signs each page (credentials, endpoint, region, addressing style) and the
# client's own HTTP session sends it (its TLS verification and CA bundle, proxies, timeouts,
# connection pool), and an ElementTree parser target keeps the few elements read.


def _list_s3(client: Any, prefix: StorageURI, page_size: int) -> Iterator[list[str]]:
    """The keys under `prefix`, page by page in S3's order."""
    session = _http_session(client)
    if session is None:
        # Not botocore's client (a wrapper or a stand-in): it lists the slow way, but lists.
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=prefix.container, Prefix=prefix.key,
                                       PaginationConfig={"PageSize": page_size}):
            yield [item["Key"] for item in page.get("Contents", ())]
        return
    # encoding-type=url, as botocore asks for it: XML 1.0 cannot carry keys with control
    # characters, which S3 allows; keys then come back form-encoded.
    params: dict[str, Any] = {"Bucket": prefix.container, "Prefix": prefix.key, "MaxKeys": page_size,
                              "EncodingType": "url"}
    while True:
        page = _list_page(client, session, params)
        # Decoded only when S3 says it encoded them (botocore does the same): a store that
        # ignores the parameter sends keys as they are, and a `%` or `+` in them must stay.
        yield [unquote_plus(key) for key in page.keys] if page.fields.get("EncodingType") == "url" else page.keys
        if page.fields.get("IsTruncated") != "true":
            return
        token = page.fields.get("NextContinuationToken")
        if not token or token == params.get("ContinuationToken"):
            # botocore's paginator refuses the same: the listing would never end.
            raise S3ListingError(f"ListObjectsV2 on bucket {prefix.container!r}: a truncated page "
                                 f"{'without a' if not token else 'repeating its'} NextContinuationToken")
        params["ContinuationToken"] = token


def _http_session(client: Any) -> Any | None:
    """The HTTP session `client` sends its own requests with, or None for a client that is not
    botocore's. botocore has no public accessor for it, and a session made here would not know
    the client's `verify`, proxies or client certificate."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    return session if callable(getattr(session, "send", None)) else None


def _list_page(client: Any, session: Any, params: dict[str, Any]) -> _Body:
    """One ListObjectsV2 page, retried as botocore's standard mode would.

    Raises the modeled botocore ClientError (NoSuchBucket, AccessDenied, ...) for an S3
    error, S3ListingError for anything else; neither carries the presigned URL."""
    from botocore.awsrequest import AWSRequest
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    bucket = params["Bucket"]
    attempt = 1
    while True:
        # Signed afresh for each try: the credentials botocore holds may have been refreshed.
        url = client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=LIST_URL_EXPIRES_S)
        failure: Exception
        try:
            response = session.send(AWSRequest(method="GET", url=url).prepare())
        except (BotoConnectionError, HTTPClientError) as exc:  # what botocore's retries treat as transient
            # Raised below, outside this handler, so that nothing chains botocore's exception:
            # its message and its request hold the presigned URL.
            failure = S3ListingError(f"ListObjectsV2 on bucket {bucket!r}: {type(exc).__name__}: {redact(str(exc))}")
            retry = True
        else:
            status, body = response.status_code, _Body.parse(response.content)
            if 200 <= status < 300 and body is not None and body.root == "ListBucketResult":
                return body
            if 200 <= status < 300 and (body is None or body.root != "Error"):
                # A body cut short by the network: retried, as botocore does.
                failure = S3ListingError(f"ListObjectsV2 on bucket {bucket!r}: HTTP {status} with "
                                         f"{'a body that is no XML' if body is None else f'<{body.root}>'}")
                retry = True
            else:
                if status < 300:
                    status = 500  # S3's 200 with an <Error> body is a server error (to botocore too)
                code, message = _error_fields(body, status)
                failure = client.exceptions.from_code(code)(
                    {"Error": {"Code": code, "Message": message},
                     "ResponseMetadata": {"HTTPStatusCode": status,
                                          "RequestId": response.headers.get("x-amz-request-id", "")}},
                    "ListObjectsV2")
                retry = status in _RETRY_STATUS or code in _RETRY_CODES
        if not retry or attempt >= LIST_ATTEMPTS:
            raise failure
        time.sleep(random.uniform(0, LIST_RETRY_BASE_S * 2 ** (attempt - 1)))
        attempt += 1


_FIELDS = ("IsTruncated", "NextContinuationToken", "EncodingType", "Code", "Message")
"""Text children of the root kept: a ListBucketResult's, and an Error's."""


class _Body:
    """What a listing reads of a response body: the root's local name, the keys of its
    <Contents> and the text of its `_FIELDS`, whatever namespace the store puts them in.

    An ElementTree parser target, so no tree is built: a tree has seven or more elements a
    key, and allocating and garbage-collecting them costs more than the parse itself."""

    def __init__(self) -> None:
        self.root = ""
        self.keys: list[str] = []
        self.fields: dict[str, str] = {}
        self._depth = 0
        self._in_contents = False
        self._key_tag = self._contents_tag = ""
        self._field_tags: dict[str, str] = {}
        self._capturing: str | None = None
        self._text: list[str] = []

    @classmethod
    def parse(cls, data: bytes) -> _Body | None:
        """The body's parts, or None when it is no well-formed XML (empty, cut short)."""
        body = cls()
        parser = ET.XMLParser(target=body)
        try:
            parser.feed(data)
            parser.close()
        except ET.ParseError:
            return None
        return body

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self._depth += 1
        if self._depth == 3:  # the common case first: <Key>, <Size>, <ETag>... of a <Contents>
            if self._in_contents and tag == self._key_tag:
                self._capturing, self._text = tag, []
        elif self._depth == 2:
            self._in_contents = tag == self._contents_tag
            if tag in self._field_tags:
                self._capturing, self._text = self._field_tags[tag], []
        elif self._depth == 1:
            ns, _, self.root = tag.rpartition("}")
            ns = f"{ns}}}" if ns else ""
            self._key_tag, self._contents_tag = f"{ns}Key", f"{ns}Contents"
            self._field_tags = {f"{ns}{name}": name for name in _FIELDS}

    def data(self, text: str) -> None:
        if self._capturing is not None:
            self._text.append(text)  # expat may hand one element's text over in pieces

    def end(self, tag: str) -> None:
        if self._capturing is not None:
            if self._depth == 3:
                self.keys.append("".join(self._text))
            else:
                self.fields[self._capturing] = "".join(self._text)
            self._capturing = None
        self._depth -= 1

    def close(self) -> _Body:
        return self


def _error_fields(body: _Body | None, status: int) -> tuple[str, str]:
    """S3's <Code> and <Message>, or the status and its phrase where the body has none (a
    proxy's HTML page), as botocore reports such responses."""
    if body is not None and body.root == "Error" and body.fields.get("Code"):
        return body.fields["Code"], body.fields.get("Message", "")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return str(status), phrase


def first(iterator: Iterator[Any]) -> Any:
    """next(iterator, None), as a function a thread can run."""
    return next(iterator, None)
