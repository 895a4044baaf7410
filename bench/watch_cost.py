"""CPU per ImageJob watch event: kopf's handler path against a raw watch, in one run.

A real etcd + kube-apiserver holds OBJECTS ImageJobs shaped like the operator's (spec and
a full status). Watcher processes run side by side on it, each receiving the same events:

- `kopf`: kopf with one `@kopf.on.event` ImageJob handler that does nothing, configured as
  the operator configured it before this bench (its settings, INFO logging to a file);
- `kopf, WARNING logs`: the same with kopf's per-object INFO lines ("Handler ...
  succeeded") turned off, the cheapest kopf can be made without patching it;
- `raw watch, every event handed over`: gpuroute_operator.kube.job_watch.ImageJobWatch with
  its filter off, so its handler runs for every event as kopf's does;
- `raw watch, as the operator runs it`: the same with the filter on (events that change
  nothing for the engine are dropped after decoding).

The bench client then makes EVENTS status patches spread over the objects (a MODIFIED
event each, what the operator's own status writes cause), then bumps an annotation on a
sentinel object; once every watcher has reported the sentinel, it reads each watcher's
CPU (utime + stime from /proc/<pid>/stat) and subtracts its idle CPU over the same wall
time, measured before. CPU per event = that / EVENTS, over ROUNDS rounds (median).
kopf may merge events of one object that arrive within its 0.1 s batch window; that is
part of what it costs per received event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import row
from bench.control_plane import _cpu_seconds

GROUP, VERSION, PLURAL, NS = "gpuroute.io", "v1alpha1", "imagejobs", "watch-bench"
SENTINEL = "sentinel"
SENTINEL_ANNOTATION = "gpuroute.io/cancel"  # part of the raw watch's key, so even the filtered watch sees it
MODES = {"kopf": "kopf (as configured before)", "kopf-quiet": "kopf, WARNING logs",
         "raw-all": "raw watch, every event handed over", "raw": "raw watch, as the operator runs it"}


def _job(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob",
            "metadata": {"name": name, "annotations": {SENTINEL_ANNOTATION: "round-0"} if name == SENTINEL else {}},
            "spec": {"input": {"uri": "s3://bench/in/256.png"}, "output": {"uri": f"s3://bench/out/{name}.png"},
                     "steps": [{"op": "invert"}], "priority": "realtime"}}


def _status(i: int) -> dict[str, Any]:
    """A status shaped like a Dispatched one: phase, decision, timing; `message` moves."""
    return {"phase": "Dispatched", "message": f"update {i}", "attempts": 1, "observedGeneration": 1,
            "pool": "bench-pool", "worker": "w1", "gpu": "cpu",
            "decision": "bench-pool: balanced, fastest eligible (score 0.50 of 1 pool)",
            "timing": {"queuedAt": "2025-01-01T00:00:00.000000Z", "dispatchedAt": "2025-01-01T00:00:00.010000Z"}}


# ---- the watcher processes ----------------------------------------------------------------


def _note(body: Mapping[str, Any]) -> None:
    meta = body.get("metadata") or {}
    if meta.get("name") == SENTINEL:
        print(f"seen {(meta.get('annotations') or {}).get(SENTINEL_ANNOTATION)}", flush=True)


def _child_kopf(quiet: bool) -> None:
    import kopf

    @kopf.on.startup()
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The operator's settings before this bench (handlers.operator_startup then).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpuroute.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="gpuroute.io")
        settings.posting.level = logging.WARNING
        settings.scanning.disabled = True

    @kopf.on.event(GROUP, VERSION, PLURAL)
    async def on_event(body: kopf.Body, **_: Any) -> None:
        _note(body)

    kopf.configure(verbose=False, log_prefix=True)
    if quiet:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(standalone=True, clusterwide=True))


def _child_raw(skip_unchanged: bool) -> None:
    from gpuroute_operator.kube.api import AsyncKube
    from gpuroute_operator.kube.job_watch import ImageJobWatch, WatchConfig

    async def observe(body: Mapping[str, Any]) -> None:
        _note(body)

    async def main() -> None:
        watch = ImageJobWatch(AsyncKube(os.environ["KUBECONFIG"]), observe, lambda uid: None,
                              WatchConfig(skip_unchanged=skip_unchanged))
        watch.start()
        await asyncio.Event().wait()

    asyncio.run(main())


# ---- the bench client -----------------------------------------------------------------------


class Watcher:
    """One watcher subprocess and the sentinel values it reported."""

    def __init__(self, mode: str, kubeconfig: str, log: Path) -> None:
        self.mode = mode
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        self._log = log.open("ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "bench.watch_cost", "--child", mode], env=env,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.seen: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("seen "):
                self.seen.put(line.split(" ", 1)[1].strip())

    def wait_for(self, value: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.popen.poll() is not None:
                raise TimeoutError(f"{self.mode} watcher did not report {value} (exit {self.popen.poll()})")
            try:
                if self.seen.get(timeout=min(remaining, 1.0)) == value:
                    return
            except queue.Empty:
                continue

    def cpu(self) -> float:
        return _cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log.close()


def run(*, objects: int = 50, events: int = 2000, rounds: int = 3, clients: int = 4,
        idle_s: float = 4.0) -> dict[str, Any]:
    from kubernetes import client

    from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig

    with tempfile.TemporaryDirectory(prefix="gpuroute-watch-bench-") as tmp, ControlPlane(ControlPlaneConfig()) as cp:
        api = cp.api_client()
        custom = client.CustomObjectsApi(api)
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
        names = [f"job-{i}" for i in range(objects)]
        for name in [*names, SENTINEL]:
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _job(name))
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, name, {"status": _status(0)})
        watchers = [Watcher(mode, cp.kubeconfig, Path(tmp) / f"{mode}.log") for mode in MODES]
        per_event: dict[str, list[float]] = {w.mode: [] for w in watchers}
        patch_s: list[float] = []
        try:
            for w in watchers:
                w.wait_for("round-0")
            time.sleep(1.0)  # start-up work settles
            # Idle CPU: kopf and the raw watch have timers of their own; subtracted below.
            idle0, t0 = {w.mode: w.cpu() for w in watchers}, time.monotonic()
            time.sleep(idle_s)
            idle_rate = {w.mode: (w.cpu() - idle0[w.mode]) / (time.monotonic() - t0) for w in watchers}
            counter = 0
            for r in range(1, rounds + 1):
                before, started = {w.mode: w.cpu() for w in watchers}, time.monotonic()

                def patch(i: int) -> None:
                    custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, names[i % objects],
                                                                 {"status": _status(i)})

                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(patch, range(counter, counter + events)))
                counter += events
                patch_s.append(time.monotonic() - started)
                custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, SENTINEL,
                                                      {"metadata": {"annotations": {SENTINEL_ANNOTATION: f"round-{r}"}}})
                for w in watchers:
                    w.wait_for(f"round-{r}")
                time.sleep(0.5)  # kopf's per-object workers finish their batch windows
                wall = time.monotonic() - started
                for w in watchers:
                    used = w.cpu() - before[w.mode] - idle_rate[w.mode] * wall
                    per_event[w.mode].append(used * 1000.0 / events)
        finally:
            for w in watchers:
                w.stop()
            api.close()
    ms = {mode: round(statistics.median(values), 4) for mode, values in per_event.items()}
    kopf_ms, raw_all_ms, raw_ms = ms["kopf"], ms["raw-all"], ms["raw"]
    return {
        "objects": objects, "events_per_round": events, "rounds": rounds,
        "patch_rate_per_s": round(events / statistics.median(patch_s), 1),
        "cpu_ms_per_event": ms, "cpu_ms_per_event_by_round": {k: [round(v, 4) for v in vs] for k, vs in per_event.items()},
        "idle_cpu_ms_per_s": {k: round(v * 1000, 3) for k, v in idle_rate.items()},
        "rows": [
            row("ImageJob watch", "CPU per event, raw watch, every event handed over", raw_all_ms, "ms",
                "kopf event handler, same events", kopf_ms, higher_is_better=False),
            row("ImageJob watch", "CPU per event, raw watch as the operator runs it", raw_ms, "ms",
                "kopf event handler, same events", kopf_ms, higher_is_better=False),
            row("ImageJob watch", "CPU per event, kopf with WARNING logs", ms["kopf-quiet"], "ms",
                "kopf event handler, INFO logs", kopf_ms, higher_is_better=False),
        ],
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        mode = sys.argv[2]
        if mode.startswith("kopf"):
            _child_kopf(quiet=mode == "kopf-quiet")
        else:
            _child_raw(skip_unchanged=mode == "raw")
    else:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps({k: v for k, v in run(events=int(sys.argv[1]) if len(sys.argv) > 1 else 2000).items()
                          if k != "rows"}, indent=2))
