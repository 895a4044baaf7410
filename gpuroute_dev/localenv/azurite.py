"""Azurite, Microsoft's Azure Blob Storage emulator, as a local process.

Installed on demand from the npm registry into the cache ($GPUROUTE_CACHE/azurite/VERSION,
by default ~/.cache/gpuroute/azurite/VERSION), outside the repository, then started on a
free loopback port. The account and key are Azurite's well-known development credentials.

With `oauth=True` it serves HTTPS (a throwaway self-signed certificate) and accepts
bearer tokens, so `Get User Delegation Key` and user delegation SAS can be tested; Azurite
checks a token's issuer, audience and lifetime but not its signature.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gpuroute_dev.localenv.stack import free_port
from gpuroute_dev.localenv.tls import self_signed

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret: the same in every installation).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Pinned: 3.35 computes user delegation SAS signatures for an older service version than
# the one azure-storage-blob 12.31 signs for, and rejects them.
VERSION = "3.37.0"
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 30


class AzuriteError(RuntimeError):
    """Azurite could not be installed or started."""


def _cache_dir() -> Path:
    return Path(os.environ.get("GPUROUTE_CACHE") or Path.home() / ".cache" / "gpuroute") / "azurite"


def azurite_binary(version: str = VERSION) -> Path:
    """The azurite-blob launcher of `version`, installed with npm on first use."""
    root = _cache_dir()
    binary = root / version / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteError("npm is not installed: Azurite comes from the npm registry (install Node.js and npm)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".install.lock", "w") as lock:
        # Several test sessions may start at once: one installs, the others wait and reuse it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        # Installed beside the target and renamed into place, so a failed or interrupted
        # install never leaves a half-populated folder that looks installed.
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
        # Its own package.json: without one npm walks up to the nearest parent that has one
        # and installs there instead.
        (staging / "package.json").write_text('{"name": "gpuroute-azurite", "private": true}\n')
        try:
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--silent", f"azurite@{version}"],
                cwd=staging, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise AzuriteError(f"npm install azurite@{version} did not finish in {INSTALL_TIMEOUT_S} s") from exc
        if result.returncode != 0 or not (staging / "node_modules" / ".bin" / "azurite-blob").exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise AzuriteError(f"npm install azurite@{version} failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout)[-2000:]}")
        staging.rename(root / version)
    return binary


class AzuriteServer:
    """The Blob service of Azurite on 127.0.0.1; use as a context manager."""

    account = ACCOUNT
    key = KEY

    def __init__(self, *, oauth: bool = False) -> None:
        self.oauth = oauth
        self.port = 0
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._location: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.oauth else 'http'}://127.0.0.1:{self.port}/{ACCOUNT}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def start(self) -> AzuriteServer:
        binary = azurite_binary()
        self.port = free_port()
        self._location = Path(tempfile.mkdtemp(prefix="gpuroute-azurite-"))
        args = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", str(self._location / "data"), "--silent", "--skipApiVersionCheck", "--loose"]
        if self.oauth:
            # Bearer tokens are only accepted over HTTPS.
            cert, key = self_signed(self._location)
            self.ca_file = cert
            args += ["--oauth", "basic", "--cert", str(cert), "--key", str(key)]
        # A file, not a pipe: nobody drains a pipe while the server runs, and a full one would stall it.
        with open(self._location / "azurite.log", "wb") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=1, context=self._ssl_context())
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature): it is up
            except OSError as exc:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    output = (self._location / "azurite.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise AzuriteError(f"Azurite {VERSION} did not answer on port {self.port} within "
                                       f"{START_TIMEOUT_S} s: {output or exc}") from exc
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            # Azurite closes its server on SIGTERM but its node process lingers (open timers):
            # once it reports closing done, or after a few seconds, it is killed.
            log = self._location / "azurite.log" if self._location is not None else None
            deadline = time.monotonic() + 5
            while self._process.poll() is None and time.monotonic() < deadline:
                if log is not None and log.exists() and b"successfully closed" in log.read_bytes()[-4096:]:
                    break
                time.sleep(0.1)
            if self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)
        self._process = None
        if self._location is not None:
            shutil.rmtree(self._location, ignore_errors=True)
            self._location = None

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A BlobServiceClient signing with the account key."""
        from azure.storage.blob import BlobServiceClient

        extra: dict[str, Any] = {"connection_verify": str(self.ca_file)} if self.ca_file else {}
        return BlobServiceClient(account_url=self.endpoint, credential={"account_name": ACCOUNT, "account_key": KEY},
                                 **extra)

    def env(self) -> dict[str, str]:
        """What the operator needs to sign for this account with its key."""
        return {f"GPUROUTE_AZURE_KEY_{ACCOUNT.upper()}": KEY}

    def operator_args(self) -> list[str]:
        return ["--azure-account", f"{ACCOUNT}={self.endpoint}"]
