"""A WorkerPool's status: availability, and the ScalingReady condition of pools that scale."""

from __future__ import annotations

from gpuroute_operator.core.pools import PoolState, parse_pool_spec
from gpuroute_operator.shell.pool_status import pool_status

NOW = 1_800_000_000.0


def _pool(**spec: object) -> PoolState:
    return PoolState(parse_pool_spec("p", {"workerKeysSecretRef": {"name": "k"}, **spec}, generation=3,
                                     default_namespace="gpuroute-system"))


def test_a_pool_without_workers_is_unavailable_and_says_why() -> None:
    status = pool_status(_pool(), problem="", now=NOW)
    assert status["phase"] == "Unavailable" and status["observedGeneration"] == 3
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Available", "False", "NoWorkers")]
    keys = pool_status(_pool(), problem="Secret gpuroute-system/k lists no worker keys", now=NOW)
    assert keys["conditions"][0]["reason"] == "KeysProblem" and "lists no worker keys" in keys["conditions"][0]["message"]


def test_a_refused_scaling_kubeconfig_shows_as_a_condition() -> None:
    scaling = {"scaling": {"deployment": {"name": "workers"}, "maxReplicas": 3,
                           "kubeconfigSecretRef": {"name": "gpu-kubeconfig"}}}
    why = "kubeconfig entry users[0](u).user.exec is refused: it runs a command"
    failing = pool_status(_pool(**scaling), scaling_problem=why, now=NOW)["conditions"][1]
    assert (failing["type"], failing["status"], failing["reason"], failing["message"]) == (
        "ScalingReady", "False", "ScaleFailed", why)
    healthy = pool_status(_pool(**scaling), now=NOW)["conditions"][1]
    assert (healthy["type"], healthy["status"]) == ("ScalingReady", "True")
    assert len(pool_status(_pool(), now=NOW)["conditions"]) == 1  # no scaling, no condition
