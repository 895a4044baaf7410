"""PoolKeys: what a pool's keys Secret admits into ZAP, and what its absence revokes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator, Mapping

import pykube
import pytest
import zmq
import zmq.asyncio

from gpuroute.curve_keys import POOL_KEY_SUFFIX, KeyPair
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.pools import PoolSpec, parse_pool_spec
from gpuroute_operator.link.pool_keys import PoolKeys
from gpuroute_operator.link.zap import ZapHandler


class SecretStore:
    """Secrets by (namespace, name), read the way the kube client reads them (a real pykube
    ObjectDoesNotExist when one is missing, an HTTP-like error when the API is down)."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.down = False

    def put(self, namespace: str, name: str, keys: Mapping[str, bytes]) -> None:
        self.secrets[(namespace, name)] = {f"{worker}{POOL_KEY_SUFFIX}": base64.b64encode(key).decode()
                                           for worker, key in keys.items()}

    def read(self, namespace: str, name: str) -> Mapping[str, str]:
        if self.down:
            raise pykube.exceptions.HTTPError(503, "apiserver unavailable")
        try:
            return self.secrets[(namespace, name)]
        except KeyError as exc:
            raise pykube.exceptions.ObjectDoesNotExist(f"{name} does not exist.") from exc


@pytest.fixture
def zap() -> Iterator[ZapHandler]:
    context = zmq.asyncio.Context()
    try:
        yield ZapHandler(context)
    finally:
        context.term()


def _spec() -> PoolSpec:
    return parse_pool_spec("pool-a", {"cloud": "c", "region": "r", "pricePerGpuHour": 1.0,
                                      "workerKeysSecretRef": {"name": "pool-a-keys"}},
                           generation=1, default_namespace="gpuroute-system")


def test_a_deleted_keys_secret_revokes_every_key_of_the_pool(zap: ZapHandler) -> None:
    store = SecretStore()
    keys = PoolKeys(zap, store.read)
    w1, w2 = KeyPair.generate(), KeyPair.generate()
    store.put("gpuroute-system", "pool-a-keys", {"w1": w1.public, "w2": w2.public})
    admitted = asyncio.run(keys.load(_spec(), 0.0))
    assert admitted is not None and {p.key for p in admitted} == {"w1", "w2"}
    assert zap.admitted_pools() == {"pool-a": 2}

    del store.secrets[("gpuroute-system", "pool-a-keys")]
    admitted = asyncio.run(keys.load(_spec(), 10.0))
    # An empty list (not None): the dispatcher is told to keep no key, so it cuts the sessions.
    assert admitted == []
    assert zap.admitted_pools() == {}
    assert keys.counts["pool-a"] == 0
    assert "does not exist" in keys.problems["pool-a"]


def test_an_unreadable_secret_keeps_the_keys_zap_had(zap: ZapHandler) -> None:
    store = SecretStore()
    keys = PoolKeys(zap, store.read)
    w1 = KeyPair.generate()
    store.put("gpuroute-system", "pool-a-keys", {"w1": w1.public})
    first = asyncio.run(keys.load(_spec(), 0.0))
    assert first == [Principal("pool-a", "w1", w1.public.decode())]
    store.down = True
    assert asyncio.run(keys.load(_spec(), 10.0)) is None   # an API blip revokes nothing
    assert zap.admitted_pools() == {"pool-a": 1}
    assert "cannot read keys Secret" in keys.problems["pool-a"]


def test_a_key_removed_from_the_secret_is_no_longer_admitted(zap: ZapHandler) -> None:
    store = SecretStore()
    keys = PoolKeys(zap, store.read)
    w1, w2 = KeyPair.generate(), KeyPair.generate()
    store.put("gpuroute-system", "pool-a-keys", {"w1": w1.public, "w2": w2.public})
    asyncio.run(keys.load(_spec(), 0.0))
    store.put("gpuroute-system", "pool-a-keys", {"w2": w2.public})
    assert asyncio.run(keys.load(_spec(), 10.0)) == [Principal("pool-a", "w2", w2.public.decode())]
    assert zap.admitted_pools() == {"pool-a": 1}
