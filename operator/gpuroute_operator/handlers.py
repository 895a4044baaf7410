"""kopf handlers: thin adapters from Kubernetes events to the Engine.

ImageJobs use kopf's low-level event handlers rather than create/update/delete
handlers: the engine is idempotent per uid, so it needs no per-object progress
annotations or finalizers. That saves two API writes per job, and deleting an
ImageJob never hangs on a finalizer while the operator is down (an Argo CD prune
must not wait for us).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from gpuroute_operator.engine import Engine, EngineConfig
from gpuroute_operator.pools import PoolSpecError, parse_pool_spec
from gpuroute_operator.status import ObjectRef
from gpuroute_operator.web import WebConfig, start_web

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
    engine = Engine(memo.engine_config)
    await engine.start()
    memo.engine = engine
    web: WebConfig = memo.web_config
    memo.web = await start_web(engine, web) if web.port or web.metrics_port else None


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("web") is not None:
        await memo.web.cleanup()
    await memo.engine.stop()


@kopf.on.event(GROUP, VERSION, "imagejobs")
async def imagejob_event(type: str | None, body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    if type == "DELETED":
        memo.engine.forget(uid)
    else:
        await memo.engine.observe_job(body)


@kopf.on.event(GROUP, VERSION, "workerpools")
async def workerpool_event(type: str | None, body: kopf.Body, name: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:  # noqa: A002
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
