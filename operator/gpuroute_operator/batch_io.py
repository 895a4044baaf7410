"""A batch's object-storage I/O: listing its inputs page by page, and its results journal.

Every call here blocks (boto3, azure-storage-blob) and is made from a thread by the
batch shell (batch_runner.py). Nothing here holds image bytes: listings return keys,
and the only objects read or written are the input list and the manifest text.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

from gpuroute_operator.spec import SpecError, StorageURI, parse_storage_uri
from gpuroute_operator.storage import Presigner

PAGE_SIZE = 1000
"""Keys per listing page (S3's maximum)."""


class StorageIOError(RuntimeError):
    """Listing or manifest I/O failed (network, permissions, a missing object)."""


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
        for number, line in enumerate(self._read_lines(uri), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
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
                paginator = self._presigner.s3_client().get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=prefix.container, Prefix=prefix.key,
                                               PaginationConfig={"PageSize": page_size}):
                    yield [item["Key"] for item in page.get("Contents", ())]
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

    def _read_lines(self, uri: StorageURI) -> Iterator[str]:
        try:
            if uri.scheme == "s3":
                body = self._presigner.s3_client().get_object(Bucket=uri.container, Key=uri.key)["Body"]
                for raw in body.iter_lines():
                    yield raw.decode("utf-8", errors="replace")
            else:
                container = self._presigner.azure_container(uri)
                with container:
                    text = container.download_blob(uri.key).readall().decode("utf-8", errors="replace")
                yield from text.splitlines()
        except SpecError:
            raise
        except Exception as exc:  # see _list_keys
            raise _wrap(uri, exc) from exc

    # ---- journal and manifest ---------------------------------------------------------------

    def read_journal(self, prefix: StorageURI) -> Iterator[str]:
        """Every line of every journal part under `prefix`, parts in order."""
        for page in self._list_keys(prefix, PAGE_SIZE):
            for key in sorted(page):
                yield from self._read_lines(StorageURI(prefix.scheme, prefix.container, key))

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

    def write_manifest(self, journal: StorageURI, target: StorageURI) -> None:
        """Concatenate the journal's parts into the results manifest (one object)."""
        lines = list(self.read_journal(journal))
        self.write(target, "".join(f"{line}\n" for line in lines if line.strip()))


def first(iterator: Iterator[Any]) -> Any:
    """next(iterator, None), as a function a thread can run."""
    return next(iterator, None)
