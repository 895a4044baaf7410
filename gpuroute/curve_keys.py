"""CURVE key pairs: generation, files, and Kubernetes Secret manifests.

Keys are Z85 text (40 characters). A secret-key file is enough for its owner: the
public half is derived from it. Secrets use fixed data keys so the manifests in
manifests/ can mount them:

- operator:  `server.key_secret` (management cluster) and `server.key` (both clusters)
- worker:    `worker.key_secret` (GPU cluster)
- pool:      `<worker-name>.key`, the public keys a WorkerPool admits (management cluster)
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import zmq

_Z85_KEY = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
WORKER_SECRET = "worker.key_secret"
POOL_KEY_SUFFIX = ".key"


class KeyError_(ValueError):
    """A key file or Secret entry that does not hold a Z85 CURVE key."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85."""

    public: bytes
    """40-byte Z85 public key, shared with peers."""
    secret: bytes
    """40-byte Z85 secret key, never leaves its owner."""

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> KeyPair:
        return cls(zmq.curve_public(secret), secret)


def parse_key(raw: bytes | str, *, source: str) -> bytes:
    """Validate Z85 key text (surrounding whitespace allowed) and return it as bytes."""
    data = raw.encode() if isinstance(raw, str) else raw
    # zmq's own certificate files (ZPL) are accepted too: take the key value out of them.
    # A zmq secret certificate lists the public key first: the secret one wins when present.
    match = re.search(rb'secret-key\s*=\s*"([^"]{40})"', data) or re.search(rb'public-key\s*=\s*"([^"]{40})"', data)
    key = match.group(1) if match else data.strip()
    if not _Z85_KEY.match(key):
        raise KeyError_(f"{source}: not a Z85 CURVE key (expected 40 Z85 characters)")
    return key


def read_key_file(path: str | Path) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise KeyError_(f"cannot read key file {path}: {exc.strerror}") from exc
    return parse_key(raw, source=str(path))


def write_key_file(path: str | Path, key: bytes) -> None:
    target = Path(path)
    target.write_bytes(key + b"\n")
    target.chmod(0o600)


def _secret(name: str, namespace: str, data: dict[str, bytes], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def operator_secrets(pair: KeyPair, *, namespace: str, worker_namespace: str) -> list[dict[str, Any]]:
    """The operator's key Secret and the public-key Secret the GPU cluster mounts."""
    labels = {"app.kubernetes.io/part-of": "gpuroute", "gpuroute.io/key": "operator"}
    return [
        _secret("gpuroute-operator-curve", namespace, {SERVER_SECRET: pair.secret, SERVER_PUBLIC: pair.public}, labels),
        _secret("gpuroute-operator-public", worker_namespace, {SERVER_PUBLIC: pair.public}, labels),
    ]


def worker_secrets(pair: KeyPair, *, pool: str, worker: str, namespace: str, worker_namespace: str) -> list[dict[str, Any]]:
    """The worker's key Secret (GPU cluster) and the pool's allowlist Secret (management cluster)."""
    labels = {"app.kubernetes.io/part-of": "gpuroute", "gpuroute.io/pool": pool}
    return [
        _secret(f"gpuroute-worker-{pool}", worker_namespace, {WORKER_SECRET: pair.secret}, labels),
        _secret(f"gpuroute-pool-{pool}-keys", namespace, {f"{worker}{POOL_KEY_SUFFIX}": pair.public}, labels),
    ]


def public_keys_from_secret_data(data: dict[str, str] | None, *, source: str) -> dict[str, bytes]:
    """Worker name -> public key from a pool Secret's base64 `data`; bad entries raise."""
    keys: dict[str, bytes] = {}
    for name, value in (data or {}).items():
        if not name.endswith(POOL_KEY_SUFFIX):
            continue
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise KeyError_(f"{source}[{name}]: not base64") from exc
        keys[name[: -len(POOL_KEY_SUFFIX)]] = parse_key(raw, source=f"{source}[{name}]")
    return keys


def dump_manifests(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)
