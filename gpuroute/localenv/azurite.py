"""Azurite, Microsoft's Azure Blob Storage emulator, as a local process.

Installed on demand from the npm registry into the cache (~/.cache/gpuroute/azurite,
or $GPUROUTE_CACHE/azurite), outside the repository, then started on a free loopback
port. The account and key are Azurite's well-known development credentials.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gpuroute.localenv.stack import free_port

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret: the same in every installation).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "3"


class AzuriteError(RuntimeError):
    """Azurite could not be installed or started."""


def azurite_binary() -> Path:
    root = Path(os.environ.get("GPUROUTE_CACHE", Path.home() / ".cache" / "gpuroute")) / "azurite"
    binary = root / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteError("npm is not installed: Azurite comes from the npm registry (install Node.js)")
    root.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", f"azurite@{VERSION}"], cwd=root,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not binary.exists():
        raise AzuriteError(f"npm install azurite failed ({result.returncode}): {result.stderr[-2000:]}")
    return binary


class AzuriteServer:
    """The Blob service of Azurite on 127.0.0.1; use as a context manager."""

    account = ACCOUNT
    key = KEY

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._location: str | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self) -> AzuriteServer:
        binary = azurite_binary()
        self.port = free_port()
        self._location = tempfile.mkdtemp(prefix="gpuroute-azurite-")
        self._process = subprocess.Popen(
            [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self._location,
             "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature): it is up
            except OSError as exc:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                    self.stop()
                    raise AzuriteError(f"Azurite did not start: {stderr[-2000:]}") from exc
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(10)
        if self._location:
            shutil.rmtree(self._location, ignore_errors=True)

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(account_url=self.endpoint, credential={"account_name": ACCOUNT, "account_key": KEY})

    def env(self) -> dict[str, str]:
        """What the operator needs to sign for this account."""
        return {f"GPUROUTE_AZURE_KEY_{ACCOUNT.upper()}": KEY}

    def operator_args(self) -> list[str]:
        return ["--azure-account", f"{ACCOUNT}={self.endpoint}"]
