"""The operator's HTTP endpoint: the status page (/), /api/status, Prometheus /metrics and /healthz."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from gpuroute_operator.engine import Engine


def status_snapshot(engine: Engine) -> dict[str, Any]:
    return {
        "pools": [{"name": name, **engine.pool_status(pool)} for name, pool in engine.pools.items()],
        "activeJobs": [{"namespace": j.namespace, "name": j.name, **j.status()} for j in engine.jobs.values()],
        "recentJobs": list(reversed(engine.recent.values())),
        "unrouted": len(engine.unrouted),
        "statusBacklog": engine.writer.backlog,
    }


async def start_web(engine: Engine, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def api_status(_: web.Request) -> web.Response:
        return web.json_response(status_snapshot(engine))

    page = resources.files("gpuroute_operator").joinpath("static/status.html").read_text()

    async def status_page(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.add_routes([web.get("/", status_page), web.get("/metrics", metrics), web.get("/healthz", healthz),
                    web.get("/api/status", api_status)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
