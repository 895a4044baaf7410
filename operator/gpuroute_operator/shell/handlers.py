"""kopf handlers: start-up, clean-up and WorkerPools; ImageJobs come from job_watch.py.

kopf is not watching ImageJobs: every status patch the operator makes comes back as a
MODIFIED event, and kopf's per-event work costs several times a raw watch's CPU on
them (bench/watch_cost.py; the measured ratio is in bench/results/latest.md). The raw watch drops those events after decoding
and hands the rest to the same engine entry points. The engine is idempotent per uid, so
it needs no per-object progress annotations or finalizers: deleting an ImageJob never
hangs on a finalizer while the operator is down (an Argo CD prune must not wait for us).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from gpuroute_operator.core.pools import PoolSpecError, parse_pool_spec
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.kube.job_watch import ImageJobWatch
from gpuroute_operator.shell.engine import Engine, EngineConfig
from gpuroute_operator.web.console import WebConfig, start_web

GROUP, VERSION = "gpuroute.io", "v1alpha1"


@kopf.on.startup()
async def operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps its own bookkeeping in annotations: status belongs to gpuroute's schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpuroute.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="gpuroute.io")
    # The engine posts its own Events on phase transitions; kopf's would duplicate them.
    settings.posting.level = logging.WARNING
    # Re-open watches every 5 minutes: cloud load balancers drop idle long-lived streams silently.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Back off briefly on API errors; a management-cluster blip should not stall dispatch long.
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.networking.request_timeout = 30
    # No CRD/namespace scanning: resources are fixed, so the operator needs no CRD list RBAC.
    settings.scanning.disabled = True
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Not a kopf setting: its per-object logger writes "Handler ... succeeded" at INFO
        # for every WorkerPool event (10 to 15% of its per-event CPU); errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    engine = Engine(memo.engine_config)
    await engine.start()
    memo.engine = engine
    # After the engine: the first list hands it every ImageJob (a new leader resumes them).
    memo.job_watch = ImageJobWatch(engine.api, engine.observe_job, engine.forget)
    memo.job_watch.start()
    web: WebConfig = memo.web_config
    memo.web = await start_web(engine.snapshot, engine.api, web) if web.port or web.metrics_port else None


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("job_watch") is not None:
        await memo.job_watch.stop()
    if memo.get("web") is not None:
        await memo.web.cleanup()
    await memo.engine.stop()


@kopf.on.event(GROUP, VERSION, "workerpools")
async def workerpool_event(type: str | None, body: kopf.Body, name: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    engine: Engine = memo.engine
    seen: dict[str, int] = memo.setdefault("pool_generations", {})
    if type == "DELETED":
        seen.pop(name, None)
        engine.remove_pool(name)
        return
    # The operator's own status patches come back as MODIFIED events; the status
    # subresource leaves metadata.generation alone, so an unchanged generation means
    # nothing here changed: skipping it closes the write -> event -> work loop.
    generation = int(body.metadata.get("generation") or 1)
    if seen.get(name) == generation:
        return
    seen[name] = generation
    try:
        spec = parse_pool_spec(name, body.get("spec"), generation=generation,
                               default_namespace=engine.config.namespace)
    except PoolSpecError as exc:
        logger.error("WorkerPool %s is invalid: %s", name, exc)
        engine.writer.event(ObjectRef("WorkerPool", name, None, body.metadata.uid or ""), "InvalidSpec", str(exc), warning=True)
        return
    await engine.configure_pool(spec)


def make_memo(config: EngineConfig, *, web: WebConfig) -> kopf.Memo:
    return kopf.Memo(engine_config=config, web_config=web)
