"""A batch's S3 listing (batch_io.BatchStore) over real HTTP: presigned ListObjectsV2 pages
through a front that checks every SigV4 signature, awkward keys, page order, errors that
name the bucket but never carry a signature, retries, and the journal helpers on top."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from gpuroute_dev.localenv.objectstore import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, REGION
from gpuroute_dev.localenv.sigv4front import VerifyingS3
from gpuroute_operator.batch import store as batch_io
from gpuroute_operator.batch.store import BatchStore, StorageIOError
from gpuroute_operator.core.spec import SpecError, StorageURI
from gpuroute_operator.storage.presign import Presigner

BUCKET = "listing"
ODD = [
    "plain.png", "with space.png", "two  spaces .png", "ünïcödé.png", "日本語/画像.png", "emoji-🙂.png",
    "a&b.png", "a<b>.png", "a+b.png", "100%.png", "%41%2F.png", "q?x=1#frag.png", "semi;colon,comma.png",
    "quote'\"back`.png", "tab\there.png", "folder/", "folder/inner.png", "~tilde.png",
]
"""Keys under odd/: XML escapes, form- and percent-encoding look-alikes, a trailing-slash folder object."""
CONTROL = "ctl/start\x01\x1fend.png"
"""A key XML 1.0 cannot carry: listed only because the listing asks for encoding-type=url."""
MANY = [f"many/img-{i:03d}.png" for i in range(30)]
SECRETS = ("X-Amz-Signature", "Signature=", "X-Amz-Credential")


def _client(endpoint: str, secret: str = DUMMY_SECRET_ACCESS_KEY) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=DUMMY_ACCESS_KEY_ID, aws_secret_access_key=secret,
        region_name=REGION, config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _uri(key: str, bucket: str = BUCKET) -> StorageURI:
    return StorageURI("s3", bucket, key)


@pytest.fixture(scope="module")
def s3() -> Iterator[VerifyingS3]:
    with VerifyingS3() as server:
        server.backend.create_bucket(BUCKET)
        client = server.backend.client()
        for key in [f"odd/{k}" for k in ODD] + MANY + [CONTROL]:
            client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
        yield server


@pytest.fixture
def store(s3: VerifyingS3) -> BatchStore:
    """Lists through the verifying front: a listing signed wrongly, or not presigned, is refused."""
    return BatchStore(Presigner(s3_client=_client(s3.endpoint_url)))


def _reference(s3: VerifyingS3, prefix: str) -> list[str]:
    """What boto3's own paginator lists (straight from moto): S3's order, keys decoded."""
    pages = s3.backend.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", ())]


def test_awkward_keys_come_back_exact_and_in_order(s3: VerifyingS3, store: BatchStore) -> None:
    refused = len(s3.refused)
    pages = list(store._list_keys(_uri("odd/"), 7))
    keys = [key for page in pages for key in page]
    assert keys == _reference(s3, "odd/")
    assert sorted(keys) == sorted(f"odd/{k}" for k in ODD)
    assert keys == sorted(keys, key=lambda k: k.encode())  # S3 orders by UTF-8 bytes
    assert [len(page) for page in pages] == [7] * (len(ODD) // 7) + [len(ODD) % 7]
    assert len(s3.refused) == refused  # every page's signature held
    # The public view: the folder object and other prefixes left out, `match` on the name.
    listed = [uri.key for page in store.list_prefix(_uri("odd/"), None, page_size=7) for uri in page
              if isinstance(uri, StorageURI)]
    assert "odd/folder/" not in listed and "odd/folder/inner.png" in listed and len(listed) == len(ODD) - 1
    matched = [uri.key for page in store.list_prefix(_uri("odd/"), "a*.png") for uri in page
               if isinstance(uri, StorageURI)]
    assert matched == ["odd/a&b.png", "odd/a+b.png", "odd/a<b>.png"]
    assert list(store._list_keys(_uri("ctl/"), 7)) == [[CONTROL]]


def test_many_pages_in_order(store: BatchStore) -> None:
    pages = list(store._list_keys(_uri("many/"), 7))
    assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
    assert [key for page in pages for key in page] == MANY
    assert [key for page in store._list_keys(_uri("many/"), 30) for key in page] == MANY  # one full page


def test_empty_prefix_and_bucket_root(s3: VerifyingS3, store: BatchStore) -> None:
    assert list(store._list_keys(_uri("nothing/here/"), 7)) == [[]]
    assert list(store.list_prefix(_uri("nothing/here/"), "*.png")) == [[]]
    everything = [key for page in store._list_keys(_uri(""), 1000) for key in page]
    assert everything == _reference(s3, "") and len(everything) == len(ODD) + len(MANY) + 1


def _assert_clean(message: str) -> None:
    for secret in SECRETS:
        assert secret not in message, message


def test_missing_bucket_names_it_and_carries_no_signature(store: BatchStore) -> None:
    with pytest.raises(StorageIOError) as caught:
        list(store._list_keys(_uri("in/", bucket="no-such-bucket"), 7))
    message = str(caught.value)
    assert "no-such-bucket" in message and "NoSuchBucket" in message
    _assert_clean(message)
    cause = caught.value.__cause__
    assert isinstance(cause, ClientError) and cause.response["Error"]["Code"] == "NoSuchBucket"
    assert cause.__cause__ is None and cause.__context__ is None


def test_a_wrongly_signed_listing_is_refused_once(s3: VerifyingS3) -> None:
    store = BatchStore(Presigner(s3_client=_client(s3.endpoint_url, secret="not-the-secret")))
    refused = len(s3.refused)
    with pytest.raises(StorageIOError) as caught:
        list(store._list_keys(_uri("odd/"), 7))
    assert "SignatureDoesNotMatch" in str(caught.value)
    _assert_clean(str(caught.value))
    assert s3.refused[refused:] == ["SignatureDoesNotMatch"]  # a 403 is not retried


def test_unreachable_endpoint_is_retried_then_reported_without_the_url_query(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_io, "LIST_RETRY_BASE_S", 0.01)
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]  # bound and closed again: nothing listens there now
    store = BatchStore(Presigner(s3_client=_client(f"http://127.0.0.1:{port}")))
    with pytest.raises(StorageIOError) as caught:
        list(store._list_keys(_uri("odd/"), 7))
    message = str(caught.value)
    assert BUCKET in message and "EndpointConnectionError" in message
    _assert_clean(message)
    cause = caught.value.__cause__
    assert isinstance(cause, batch_io.S3ListingError) and cause.__cause__ is None
    assert cause.__context__ is None  # botocore's exception (it holds the URL) is not chained


class _ScriptedFront:
    """Answers the first requests from a script of (status, body), then forwards to moto,
    optionally rewriting the request's path and query (no signature checks: moto ignores them)."""

    def __init__(self, backend_url: str, script: list[tuple[int, bytes]],
                 rewrite: Callable[[str], str] = lambda path: path) -> None:
        self.script = list(script)
        self.requests = 0
        backend = urlsplit(backend_url)
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                return

            def do_GET(self) -> None:
                front.requests += 1
                if front.script:
                    status, data = front.script.pop(0)
                else:
                    connection = http.client.HTTPConnection(backend.hostname or "127.0.0.1", backend.port, timeout=30)
                    try:
                        connection.request("GET", rewrite(self.path))
                        response = connection.getresponse()
                        status, data = response.status, response.read()
                    finally:
                        connection.close()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="scripted-s3", daemon=True).start()
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _error(code: str) -> bytes:
    return f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>busy</Message></Error>".encode()


@pytest.fixture
def scripted(s3: VerifyingS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., _ScriptedFront]]:
    monkeypatch.setattr(batch_io, "LIST_RETRY_BASE_S", 0.01)
    fronts: list[_ScriptedFront] = []

    def make(script: list[tuple[int, bytes]], rewrite: Callable[[str], str] = lambda path: path) -> _ScriptedFront:
        fronts.append(_ScriptedFront(s3.backend.endpoint_url, script, rewrite))
        return fronts[-1]

    yield make
    for front in fronts:
        front.close()


def test_throttling_server_errors_and_cut_bodies_are_retried(scripted: Callable[..., _ScriptedFront]) -> None:
    front = scripted([(503, _error("SlowDown")), (500, b""), (200, b"<ListBucketResult><Contents><Key>cut")])
    store = BatchStore(Presigner(s3_client=_client(front.endpoint_url)))
    assert [key for page in store._list_keys(_uri("many/"), 30) for key in page] == MANY
    assert front.requests == batch_io.LIST_ATTEMPTS


def test_retries_give_up_with_s3s_error(scripted: Callable[..., _ScriptedFront]) -> None:
    front = scripted([(503, _error("SlowDown"))] * batch_io.LIST_ATTEMPTS)
    store = BatchStore(Presigner(s3_client=_client(front.endpoint_url)))
    with pytest.raises(StorageIOError) as caught:
        list(store._list_keys(_uri("many/"), 30))
    assert "SlowDown" in str(caught.value) and "busy" in str(caught.value)
    _assert_clean(str(caught.value))
    assert front.requests == batch_io.LIST_ATTEMPTS


def test_a_proxy_page_without_s3_error_reports_the_status(scripted: Callable[..., _ScriptedFront]) -> None:
    front = scripted([(403, b"<html><body>Forbidden by policy</body></html>")])
    store = BatchStore(Presigner(s3_client=_client(front.endpoint_url)))
    with pytest.raises(StorageIOError, match=r"\(403\).*Forbidden"):
        list(store._list_keys(_uri("many/"), 30))
    assert front.requests == 1


def test_a_store_that_ignores_encoding_type_keeps_percent_and_plus(
        scripted: Callable[..., _ScriptedFront]) -> None:
    front = scripted([], rewrite=lambda path: path.replace("&encoding-type=url", "").replace("encoding-type=url&", ""))
    store = BatchStore(Presigner(s3_client=_client(front.endpoint_url)))
    keys = [key for page in store._list_keys(_uri("odd/"), 1000) for key in page]
    assert keys == [f"odd/{k}" for k in sorted(ODD, key=str.encode)]
    assert "odd/100%.png" in keys and "odd/a+b.png" in keys and "odd/%41%2F.png" in keys


def test_a_client_that_is_not_botocores_still_lists(s3: VerifyingS3) -> None:
    class Wrapped:
        """Forwards everything but botocore's endpoint (as a proxy object or a stand-in would)."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            if name == "_endpoint":
                raise AttributeError(name)
            return getattr(self._inner, name)

    store = BatchStore(Presigner(s3_client=Wrapped(s3.backend.client())))
    assert [key for page in store._list_keys(_uri("many/"), 7) for key in page] == MANY


def test_journal_parts_and_read_journal(s3: VerifyingS3, monkeypatch: pytest.MonkeyPatch) -> None:
    # Straight to moto: reading a part is a header-signed GetObject, which the front refuses.
    s3.backend.create_bucket("listing-journal")
    store = BatchStore(Presigner(s3_client=s3.backend.client()))
    journal = _uri("journal/run 1/", bucket="listing-journal")
    assert store.journal_parts(journal) == 0 and list(store.read_journal(journal)) == []
    for part in range(1, 6):
        text = f'{{"part": {part}, "n": 1}}\n{{"part": {part}, "n": 2}}\n'
        store.write(_uri(f"journal/run 1/part-{part:05d}.ndjson", bucket="listing-journal"), text)
    monkeypatch.setattr(batch_io, "PAGE_SIZE", 2)  # the journal helpers then see three pages
    assert store.journal_parts(journal) == 5
    lines = list(store.read_journal(journal))
    assert lines == [f'{{"part": {p}, "n": {n}}}' for p in range(1, 6) for n in (1, 2)]
    store.write_manifest(journal, _uri("journal/manifest.ndjson", bucket="listing-journal"))
    body = s3.backend.client().get_object(Bucket="listing-journal", Key="journal/manifest.ndjson")["Body"].read().decode()
    assert body.splitlines() == lines


def _journal_lines(parts: int, per_part: int) -> list[list[str]]:
    pad = "p" * 300  # about the size of a real manifest line
    return [[f'{{"input":"s3://b/in/{p}-{n:06d}.png","status":"succeeded","pad":"{pad}"}}' for n in range(per_part)]
            for p in range(parts)]


def test_the_manifest_is_streamed_in_parts_identical_line_for_line(s3: VerifyingS3) -> None:
    s3.backend.create_bucket("listing-manifest")
    client = s3.backend.client()
    store = BatchStore(Presigner(s3_client=client))
    journal = _uri("journal/big/", bucket="listing-manifest")
    parts = _journal_lines(4, 9000)  # about 12 MB
    for number, lines in enumerate(parts, start=1):
        store.write(_uri(f"journal/big/part-{number:08d}.jsonl", bucket="listing-manifest"),
                    "".join(f"{line}\n" for line in lines) + "\n")  # a blank line is left out
    target = _uri("journal/big.results.jsonl", bucket="listing-manifest")
    store.write_manifest(journal, target, part_bytes=5 * 1024 * 1024)
    head = client.head_object(Bucket="listing-manifest", Key=target.key)
    assert head["ETag"].strip('"').endswith("-3")  # three parts of a multipart upload, never one whole body
    body = client.get_object(Bucket="listing-manifest", Key=target.key)["Body"].read().decode()
    assert body.splitlines() == [line for lines in parts for line in lines] and body.endswith("}\n")
    assert client.list_multipart_uploads(Bucket="listing-manifest").get("Uploads", []) == []
    # A small manifest is still one plain object.
    store.write_manifest(_uri("journal/none/", bucket="listing-manifest"), target)
    assert client.get_object(Bucket="listing-manifest", Key=target.key)["Body"].read() == b""


def test_list_and_journal_lines_are_bounded_as_they_stream(s3: VerifyingS3) -> None:
    s3.backend.create_bucket("listing-lines")
    client = s3.backend.client()
    store = BatchStore(Presigner(s3_client=client))
    huge = b"s3://listing-lines/" + b"x" * (3 * 1024 * 1024)  # one 3 MB line, no storage URI
    client.put_object(Bucket="listing-lines", Key="list.txt",
                      Body=b"s3://listing-lines/a.png\r\n" + huge + b"\n# c\n\ns3://listing-lines/b.png")
    entries = [e for page in store.list_file(_uri("list.txt", bucket="listing-lines")) for e in page]
    assert [e.uri if isinstance(e, StorageURI) else type(e).__name__ for e in entries] == [
        "s3://listing-lines/a.png", "SpecError", "s3://listing-lines/b.png"]
    error = entries[1]
    assert isinstance(error, SpecError) and error.field == "spec.input.list line 2"
    assert f"longer than {batch_io.MAX_LIST_LINE_BYTES} bytes" in str(error) and len(str(error)) < 200
    client.put_object(Bucket="listing-lines", Key="journal/part-00000001.jsonl", Body=b'{"input":"x"}\n' + huge)
    with pytest.raises(batch_io.JournalCorrupt, match="part-00000001.jsonl"):
        list(store.read_journal(_uri("journal/", bucket="listing-lines")))
    store.write_manifest(_uri("journal/", bucket="listing-lines"), _uri("m.jsonl", bucket="listing-lines"))
    assert client.get_object(Bucket="listing-lines", Key="m.jsonl")["Body"].read() == b'{"input":"x"}\n'


def test_azure_lists_and_manifests_stream_too(azurite_server: Any) -> None:
    from gpuroute_dev.localenv.azurite import ACCOUNT, KEY
    from gpuroute_operator.storage.presign import AzureAccount

    service = azurite_server.client()
    container = service.create_container("batch-stream")
    store = BatchStore(Presigner(azure_accounts=[AzureAccount(ACCOUNT, azurite_server.endpoint, KEY)]))

    def uri(key: str) -> StorageURI:
        return StorageURI("azure", f"{ACCOUNT}/batch-stream", key)

    huge = b"x" * (200 * 1024)
    container.upload_blob("list.txt", b"azure://devstoreaccount1/batch-stream/a.png\n" + huge
                          + b"\nazure://devstoreaccount1/batch-stream/b.png\n")
    entries = [e for page in store.list_file(uri("list.txt")) for e in page]
    assert [getattr(e, "uri", "error") for e in entries] == [
        "azure://devstoreaccount1/batch-stream/a.png", "error", "azure://devstoreaccount1/batch-stream/b.png"]
    parts = _journal_lines(3, 6000)  # about 6 MB
    for number, lines in enumerate(parts, start=1):
        store.write(uri(f"journal/part-{number:08d}.jsonl"), "".join(f"{line}\n" for line in lines))
    store.write_manifest(uri("journal/"), uri("results.jsonl"), part_bytes=1024 * 1024)
    blob = container.get_blob_client("results.jsonl")
    assert len(blob.get_block_list("committed")[0]) >= 5  # written block by block
    body = blob.download_blob().readall().decode()
    assert body.splitlines() == [line for lines in parts for line in lines]
