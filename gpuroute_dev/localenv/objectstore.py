"""S3 for tests and the demo: moto in server mode, so traffic is real HTTP.

Code under test keeps using plain boto3 (and workers plain presigned URLs); only the
endpoint changes, through ``AWS_ENDPOINT_URL_S3``, which boto3 honours on its own.

moto keeps its state per process, not per server: two S3Server instances in one
process serve the same buckets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

__all__ = ["S3Server", "DUMMY_ACCESS_KEY_ID", "DUMMY_SECRET_ACCESS_KEY", "REGION"]

# moto accepts any credentials. Setting dummy ones explicitly keeps boto3 from
# picking up a developer's real keys (~/.aws, SSO, instance metadata), so a
# misconfigured endpoint can never sign requests against a real account, and keeps it
# from stalling on the metadata endpoint when no credentials exist at all.
DUMMY_ACCESS_KEY_ID = "testing"
DUMMY_SECRET_ACCESS_KEY = "testing"
# us-east-1 is the one region where CreateBucket needs no LocationConstraint.
REGION = "us-east-1"


class S3Server:
    """moto's S3 on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self._endpoint_url: str | None = None

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise RuntimeError("S3Server is not started")
        return self._endpoint_url

    def start(self) -> S3Server:
        if self._server is not None:
            raise RuntimeError("S3Server is already started")
        from moto.server import ThreadedMotoServer

        # Port 0: the OS picks a free port while binding, so there is no race with
        # other servers; get_host_and_port() reports it.
        # werkzeug logs every request line, presigned query (signature) included: quiet.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self._endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._endpoint_url = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess using this S3: ``base`` (default os.environ)
        with the endpoint, dummy credentials and region set."""
        env = dict(os.environ if base is None else base)
        env.update(
            AWS_ENDPOINT_URL_S3=self.endpoint_url,
            AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_ACCESS_KEY,
            AWS_DEFAULT_REGION=REGION,
        )
        # A session token or profile from the caller's shell would be sent along with
        # the dummy keys, or make boto3 prefer the profile over them.
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(name, None)
        return env

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_ACCESS_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
            region_name=REGION,
            # Virtual-hosted style would put the bucket in the host name, which does
            # not resolve for 127.0.0.1.
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __repr__(self) -> str:
        return f"S3Server({self._endpoint_url or 'stopped'})"
