"""moto S3 in server mode: real HTTP, plain boto3 and plain presigned URLs."""

from __future__ import annotations

import hashlib
import os

import pytest
import requests

from gpuroute_dev.localenv.objectstore import S3Server


def test_presigned_put_then_get_round_trip(s3_server: S3Server) -> None:
    s3_server.create_bucket("roundtrip")
    s3 = s3_server.client()
    payload = os.urandom(64 * 1024)

    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": "roundtrip", "Key": "in/a.bin"}, ExpiresIn=60
    )
    assert put_url.startswith(f"{s3_server.endpoint_url}/roundtrip/in/a.bin?")
    put = requests.put(put_url, data=payload, timeout=10)
    assert put.status_code == 200, put.text

    get_url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "roundtrip", "Key": "in/a.bin"}, ExpiresIn=60
    )
    got = requests.get(get_url, timeout=10)
    assert got.status_code == 200, got.text
    assert hashlib.sha256(got.content).digest() == hashlib.sha256(payload).digest()

    head = s3.head_object(Bucket="roundtrip", Key="in/a.bin")
    assert head["ContentLength"] == len(payload)


def test_env_configures_boto3_without_arguments(s3_server: S3Server) -> None:
    env = s3_server.env({"PATH": "/usr/bin", "AWS_PROFILE": "prod", "AWS_SESSION_TOKEN": "x"})
    assert env["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert "AWS_PROFILE" not in env and "AWS_SESSION_TOKEN" not in env
    assert env["PATH"] == "/usr/bin"


def test_servers_get_distinct_ports() -> None:
    with S3Server() as a, S3Server() as b:
        assert a.endpoint_url != b.endpoint_url
        a.create_bucket("shared-state")
        # moto's state is per process: documented, and relied on by nobody.
        names = [bkt["Name"] for bkt in b.client().list_buckets()["Buckets"]]
        assert "shared-state" in names
    with pytest.raises(RuntimeError, match="not started"):
        _ = a.endpoint_url
