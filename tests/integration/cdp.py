"""A minimal Chrome DevTools Protocol client for page tests in headless Chromium.

The page is loaded once and read repeatedly with Runtime.evaluate, so a test can see
the same page update itself (which --dump-dom cannot show).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

import aiohttp

from gpuroute_dev.localenv.stack import free_port

# Flags from the machine notes: no sandbox as root, and no background networking, which
# this closed network refuses connection by connection.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, binary: str) -> None:
        self._port = free_port()
        self._profile = tempfile.mkdtemp(prefix="gpuroute-chromium-")
        self._process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--remote-debugging-port={self._port}",
                                          f"--user-data-dir={self._profile}", "about:blank"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self._port}/json/version", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("chromium's DevTools endpoint did not come up") from None
                time.sleep(0.2)

    def close(self) -> None:
        self._process.kill()
        self._process.wait(10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def evaluate_over_time(self, url: str, expression: str, *, until: Any, timeout: float = 30.0) -> Any:
        """Open `url`, then evaluate `expression` every 0.25 s until `until(value)` holds."""
        return asyncio.run(self._evaluate_over_time(url, expression, until, timeout))

    async def _evaluate_over_time(self, url: str, expression: str, until: Any, timeout: float) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self._port}/json/new?{url}", method="PUT")
        with urllib.request.urlopen(request, timeout=5) as response:
            target = json.loads(response.read())
        async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"]) as ws:
            ids = iter(range(1, 1_000_000))
            deadline = time.monotonic() + timeout
            value: Any = None
            while time.monotonic() < deadline:
                call_id = next(ids)
                await ws.send_json({"id": call_id, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "returnByValue": True}})
                while True:
                    message = await asyncio.wait_for(ws.receive_json(), timeout=10)
                    if message.get("id") == call_id:
                        break
                value = message.get("result", {}).get("result", {}).get("value")
                if until(value):
                    return value
                await asyncio.sleep(0.25)
            raise TimeoutError(f"page never satisfied the condition; last value: {value!r}")
