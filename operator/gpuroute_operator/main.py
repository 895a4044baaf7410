"""Run the operator under kopf."""

from __future__ import annotations

import asyncio
import os

import kopf

from gpuroute_operator import handlers
from gpuroute_operator.engine import EngineConfig


def run_operator(config: EngineConfig, *, web_port: int | None, liveness_port: int | None, verbose: bool) -> None:
    if config.kubeconfig:
        # kopf's login and pykube both read $KUBECONFIG.
        os.environ["KUBECONFIG"] = config.kubeconfig
    kopf.configure(verbose=verbose, log_prefix=True)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    asyncio.run(kopf.operator(
        standalone=True,
        clusterwide=True,
        memo=handlers.make_memo(config, web_port=web_port),
        liveness_endpoint=liveness,
    ))
