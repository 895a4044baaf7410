"""Reads inputs from and writes outputs to object storage over presigned URLs.

The operator presigns (S3) or signs (Azure SAS) every URL for trusted storage; only a
user's own https:// input is untrusted and goes through the SSRF guard first.
"""

from __future__ import annotations

from collections.abc import Mapping

import requests

from gpuroute.netguard import UnsafeURL, check_public_https_url

_CHUNK = 1024 * 1024


class TransferError(RuntimeError):
    """Storage could not be reached or refused the request."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent
        """True when retrying cannot help (404, 403, too large, unsafe URL)."""


def _status_error(action: str, response: requests.Response) -> TransferError:
    # 4xx other than throttling means the URL or its grant is wrong: retrying won't help.
    permanent = 400 <= response.status_code < 500 and response.status_code not in (408, 429)
    return TransferError(f"{action} failed with HTTP {response.status_code}", permanent=permanent)


def download(url: str, *, max_bytes: int, untrusted: bool, timeout_s: float) -> bytes:
    if untrusted:
        try:
            check_public_https_url(url)
        except UnsafeURL as exc:
            raise TransferError(f"input URL refused: {exc}", permanent=True) from exc
    try:
        # Redirects are not followed: a public URL could redirect to a private address.
        with requests.get(url, stream=True, timeout=timeout_s, allow_redirects=not untrusted) as response:
            if response.status_code != 200:
                raise _status_error("download", response)
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise TransferError(f"input is {declared} bytes, limit is {max_bytes}", permanent=True)
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_content(_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise TransferError(f"input exceeds {max_bytes} bytes", permanent=True)
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise TransferError(f"download failed: {exc}", permanent=False) from exc


def upload(url: str, data: bytes, *, headers: Mapping[str, str], timeout_s: float) -> None:
    try:
        response = requests.put(url, data=data, headers=dict(headers), timeout=timeout_s)
    except requests.RequestException as exc:
        raise TransferError(f"upload failed: {exc}", permanent=False) from exc
    if response.status_code not in (200, 201):
        raise _status_error("upload", response)
