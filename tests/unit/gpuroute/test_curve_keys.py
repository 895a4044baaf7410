"""CURVE key pairs, key text parsing, key files and the Secret manifests built from them."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
import yaml
import zmq
import zmq.auth

from gpuroute.curve_keys import (
    POOL_KEY_SUFFIX,
    SERVER_PUBLIC,
    SERVER_SECRET,
    WORKER_SECRET,
    KeyError_,
    KeyPair,
    dump_manifests,
    operator_secrets,
    parse_key,
    public_keys_from_secret_data,
    read_key_file,
    worker_secrets,
    write_key_file,
)

# A fixed, valid pair so expectations are concrete.
FIXED = KeyPair.generate()


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_generate_gives_distinct_valid_z85_pairs() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    for pair in (a, b):
        assert isinstance(pair.public, bytes) and isinstance(pair.secret, bytes)
        assert len(pair.public) == len(pair.secret) == 40
        assert parse_key(pair.public, source="t") == pair.public
        assert parse_key(pair.secret, source="t") == pair.secret
    assert a.public != b.public and a.secret != b.secret
    assert a.public != a.secret


def test_from_secret_derives_the_public_half() -> None:
    pair = KeyPair.generate()
    assert KeyPair.from_secret(pair.secret) == pair
    assert KeyPair.from_secret(pair.secret).public == zmq.curve_public(pair.secret)


def test_parse_key_raw_text() -> None:
    key = FIXED.public
    assert parse_key(key, source="x") == key
    assert parse_key(key.decode(), source="x") == key
    assert parse_key(b"  \n" + key + b"\r\n\n", source="x") == key
    assert parse_key("\t" + key.decode() + "\n", source="x") == key


def test_parse_key_zpl_public_certificate(tmp_path: Path) -> None:
    public_file, _secret_file = zmq.auth.create_certificates(tmp_path, "peer")
    text = Path(public_file).read_bytes()
    expected, _ = zmq.auth.load_certificate(public_file)
    assert parse_key(text, source=public_file) == expected
    assert parse_key(text.decode(), source=public_file) == expected
    assert read_key_file(public_file) == expected


def test_parse_key_zpl_secret_certificate_gives_the_secret_key(tmp_path: Path) -> None:
    # A secret certificate holds both halves, public-key first. A secret-key file
    # (--key-file, --server-key-file) must yield the secret half, or the derived pair
    # is not the owner's identity.
    _public_file, secret_file = zmq.auth.create_certificates(tmp_path, "peer")
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    assert read_key_file(secret_file) == secret
    assert KeyPair.from_secret(read_key_file(secret_file)).public == public


def test_parse_key_hand_written_zpl() -> None:
    text = f'curve\n    secret-key = "{FIXED.secret.decode()}"\n'
    assert parse_key(text, source="cert") == FIXED.secret
    text = f'curve\n    public-key="{FIXED.public.decode()}"\n'
    assert parse_key(text, source="cert") == FIXED.public


@pytest.mark.parametrize("junk", [
    b"",
    b"   \n",
    b"x" * 39,
    b"x" * 41,
    b"x" * 20 + b" " + b"x" * 19,          # inner space
    b"x" * 39 + b",",                      # ',' is not in the Z85 alphabet
    b"x" * 39 + b"_",
    b"x" * 39 + b"~",
    b'x' * 39 + b'"',
    "x" * 39 + "\u00e9",
    b"\x00" * 40,
    b'public-key = "' + b"x" * 39 + b'"',  # certificate with a short key
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
])
def test_parse_key_rejects_junk(junk: bytes | str) -> None:
    with pytest.raises(KeyError_) as caught:
        parse_key(junk, source="the-file")
    assert str(caught.value) == "the-file: not a Z85 CURVE key (expected 40 Z85 characters)"
    assert isinstance(caught.value, ValueError)


def test_write_and_read_key_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.key_secret"
    write_key_file(path, FIXED.secret)
    assert path.read_bytes() == FIXED.secret + b"\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == FIXED.secret
    assert read_key_file(str(path)) == FIXED.secret


def test_read_key_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(KeyError_, match=r"cannot read key file .*nope\.key: No such file or directory"):
        read_key_file(missing)
    bad = tmp_path / "bad.key"
    bad.write_text("hello\n")
    with pytest.raises(KeyError_, match=r"bad\.key: not a Z85 CURVE key"):
        read_key_file(bad)


def test_operator_secrets() -> None:
    pair = KeyPair.generate()
    own, public = operator_secrets(pair, namespace="mgmt", worker_namespace="gpus")
    for obj in (own, public):
        assert (obj["apiVersion"], obj["kind"], obj["type"]) == ("v1", "Secret", "Opaque")
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/part-of": "gpuroute", "gpuroute.io/key": "operator"}
    assert own["metadata"]["name"] == "gpuroute-operator-curve"
    assert own["metadata"]["namespace"] == "mgmt"
    assert own["data"] == {SERVER_SECRET: _b64(pair.secret), SERVER_PUBLIC: _b64(pair.public)}
    assert set(own["data"]) == {"server.key_secret", "server.key"}
    assert public["metadata"]["name"] == "gpuroute-operator-public"
    assert public["metadata"]["namespace"] == "gpus"
    assert public["data"] == {"server.key": _b64(pair.public)}
    # The public Secret never carries the secret half.
    assert _b64(pair.secret) not in yaml.safe_dump(public)


def test_worker_secrets() -> None:
    pair = KeyPair.generate()
    own, allowlist = worker_secrets(pair, pool="gpu-a", worker="w7", namespace="mgmt", worker_namespace="gpus")
    labels = {"app.kubernetes.io/part-of": "gpuroute", "gpuroute.io/pool": "gpu-a"}
    assert own["metadata"] == {"name": "gpuroute-worker-gpu-a", "namespace": "gpus", "labels": labels}
    assert own["data"] == {WORKER_SECRET: _b64(pair.secret)}
    assert set(own["data"]) == {"worker.key_secret"}
    assert allowlist["metadata"] == {"name": "gpuroute-pool-gpu-a-keys", "namespace": "mgmt", "labels": labels}
    assert allowlist["data"] == {"w7.key": _b64(pair.public)}
    assert base64.b64decode(allowlist["data"]["w7.key"]) == pair.public
    # What the operator reads back from the pool Secret is exactly the worker's public key.
    assert public_keys_from_secret_data(allowlist["data"], source="s") == {"w7": pair.public}


def test_dump_manifests_round_trips_as_yaml() -> None:
    pair = KeyPair.generate()
    objects = worker_secrets(pair, pool="p", worker="w", namespace="n", worker_namespace="wn")
    text = dump_manifests(objects)
    assert text.count("---") == 1
    assert list(yaml.safe_load_all(text)) == objects
    # sort_keys=False keeps the Kubernetes-conventional order.
    assert text.lstrip().startswith("apiVersion: v1")


def test_public_keys_from_secret_data() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    data = {
        "worker-a.key": _b64(a.public),
        f"worker-b{POOL_KEY_SUFFIX}": _b64(b" " + b.public + b"\n"),
        "README": _b64(b"not a key at all"),
        "worker-a.key_secret": "!!! not even base64 !!!",
        "ca.crt": "garbage",
    }
    assert public_keys_from_secret_data(data, source="ns/pool-keys") == {"worker-a": a.public, "worker-b": b.public}
    assert public_keys_from_secret_data(None, source="s") == {}
    assert public_keys_from_secret_data({}, source="s") == {}


def test_public_keys_from_secret_data_rejects_bad_base64() -> None:
    with pytest.raises(KeyError_) as caught:
        public_keys_from_secret_data({"w.key": "not*base64"}, source="ns/secret")
    assert str(caught.value) == "ns/secret[w.key]: not base64"


def test_public_keys_from_secret_data_rejects_bad_key() -> None:
    good = KeyPair.generate().public
    with pytest.raises(KeyError_) as caught:
        public_keys_from_secret_data({"a.key": _b64(good), "b.key": _b64(b"short")}, source="ns/secret")
    assert str(caught.value) == "ns/secret[b.key]: not a Z85 CURVE key (expected 40 Z85 characters)"
