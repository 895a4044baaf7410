"""Worker keys: read from each pool's Secret, handed to ZAP, and revoked from live sessions.

Keys are re-read every KEYS_REFRESH_S (a GET per pool; no list or watch on Secrets, so
the operator needs no cluster-wide Secret access). A key that disappears from its Secret
ends its sessions within one refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from gpuroute.curve_keys import KeyError_, public_keys_from_secret_data
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.pools import PoolSpec
from gpuroute_operator.link.zap import ZapHandler

log = logging.getLogger(__name__)

KEYS_REFRESH_S = 2.0
"""How often pools' key Secrets are re-read: rotation and revocation take effect this fast."""

ReadSecret = Callable[[str, str], Mapping[str, str]]


class PoolKeys:
    """Loads each pool's admitted keys into ZAP; remembers problems for the pool status."""

    def __init__(self, zap: ZapHandler, read_secret: ReadSecret) -> None:
        self._zap = zap
        self._read_secret = read_secret
        self.problems: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self._read_at: dict[str, float] = {}

    async def load(self, spec: PoolSpec, now: float) -> list[Principal] | None:
        """The principals now admitted for the pool, or None when the Secret could not be read
        (ZAP then keeps what it had: an API blip must not disconnect a whole pool)."""
        self._read_at[spec.name] = now
        if spec.keys_secret is None:
            self.problems[spec.name] = "spec.workerKeysSecretRef is not set: no worker can join"
            self.counts[spec.name] = 0
            return self._zap.set_pool_keys(spec.name, {}, spec.cidrs)
        namespace, name = spec.keys_secret
        try:
            data = await asyncio.to_thread(self._read_secret, namespace, name)
            keys = public_keys_from_secret_data(dict(data), source=f"secret {namespace}/{name}")
        except KeyError_ as exc:
            self.problems[spec.name] = str(exc)
            log.error("pool %s: %s", spec.name, exc)
            return None
        except Exception as exc:  # pykube: ObjectDoesNotExist, HTTP errors
            if _not_found(exc):
                # The Secret is gone: that revokes every key in it.
                self.problems[spec.name] = f"keys Secret {namespace}/{name} does not exist"
                self.counts[spec.name] = 0
                return self._zap.set_pool_keys(spec.name, {}, spec.cidrs)
            self.problems[spec.name] = f"cannot read keys Secret {namespace}/{name}: {exc}"
            log.error("pool %s: %s", spec.name, self.problems[spec.name])
            return None
        self.counts[spec.name] = len(keys)
        self.problems[spec.name] = "" if keys else f"Secret {namespace}/{name} lists no worker keys"
        return self._zap.set_pool_keys(spec.name, keys, spec.cidrs)

    def due(self, name: str, now: float) -> bool:
        return now - self._read_at.get(name, float("-inf")) >= KEYS_REFRESH_S

    def remove(self, name: str) -> None:
        self._zap.remove_pool(name)
        self.problems.pop(name, None)
        self.counts.pop(name, None)
        self._read_at.pop(name, None)


def _not_found(exc: Exception) -> bool:
    return type(exc).__name__ == "ObjectDoesNotExist" or getattr(exc, "code", None) == 404
