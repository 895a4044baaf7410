"""An S3 endpoint that checks presigned URLs: a verifying front in front of moto.

moto in server mode answers tampered, unsigned and expired presigned URLs with 200, so a
test against it cannot see a bad signature. s3rver 3.7.1 (npm) was tried first: it checks
expiry but not SigV4 signatures at all (its source says "Signature version 4 calculation
is unimplemented"; a tampered, an unsigned and a wrong-secret URL all got 200).
LocalStack's S3 does validate, but localstack-core does not start outside its Docker
image here (its runtime plugins are not registered). So, as the last resort, this front
recomputes each presigned request's signature with botocore's own SigV4 query signer (the
code that made the URL) and checks X-Amz-Date + X-Amz-Expires against the clock; only
then does it forward the request to moto. Requests without a query signature (the test's
own boto3 client, which signs headers) go to moto directly, not through the front.

Refusals answer 403 with an S3-style AccessDenied / SignatureDoesNotMatch body.
"""

from __future__ import annotations

import datetime as dt
import hmac
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

from gpuroute_dev.localenv.objectstore import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, REGION, S3Server

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate"}


def verify_presigned(method: str, host: str, raw_path: str, headers: dict[str, str], now: dt.datetime, *,
                     not_before: dt.datetime | None = None) -> str | None:
    """None when the presigned request is valid; otherwise the S3 error code. `not_before`:
    signatures dated earlier are refused (credentials rotated since)."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    path, _, query = raw_path.partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    values = dict(params)
    needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
              "X-Amz-Signature")
    if any(name not in values for name in needed) or values["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        return "AccessDenied"
    access_key, _, scope = values["X-Amz-Credential"].partition("/")
    if access_key != DUMMY_ACCESS_KEY_ID:
        return "InvalidAccessKeyId"
    try:
        signed_at = dt.datetime.strptime(values["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        expires = int(values["X-Amz-Expires"])
    except ValueError:
        return "AccessDenied"
    if now > signed_at + dt.timedelta(seconds=expires) or signed_at > now + dt.timedelta(minutes=15):
        return "AccessDenied"
    if not_before is not None and signed_at < not_before:
        return "ExpiredToken"
    # The request as botocore built it, minus the signature, signed again with the same date.
    unsigned = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in params
                        if k != "X-Amz-Signature")
    signed_headers = values["X-Amz-SignedHeaders"].split(";")
    request = AWSRequest(method=method, url=f"http://{host}{path}?{unsigned}",
                         headers={h: headers.get(h, "") for h in signed_headers if h != "host"})
    request.context["timestamp"] = values["X-Amz-Date"]
    region = scope.split("/")[1] if scope.count("/") >= 3 else REGION
    auth = S3SigV4QueryAuth(Credentials(DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY), "s3", region, expires=expires)
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, values["X-Amz-Signature"]):
        return "SignatureDoesNotMatch"
    return None


class VerifyingS3:
    """moto's S3 behind a front that refuses presigned URLs whose signature or expiry is wrong."""

    def __init__(self) -> None:
        self.backend = S3Server()
        self._server: ThreadingHTTPServer | None = None
        self.refused: list[str] = []
        """Error codes of refused requests, in order (for tests)."""
        self.not_before: dt.datetime | None = None
        """Signatures dated before this are refused, as after a credential rotation."""

    @property
    def endpoint_url(self) -> str:
        """Where presigned URLs must point (the operator's AWS_ENDPOINT_URL_S3)."""
        if self._server is None:
            raise RuntimeError("VerifyingS3 is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> VerifyingS3:
        self.backend.start()
        backend = urlsplit(self.backend.endpoint_url)
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:  # the query holds signatures: never logged
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                error = verify_presigned(self.command, headers.get("host", ""), self.path, headers,
                                         dt.datetime.now(dt.UTC), not_before=front.not_before)
                if error is not None:
                    front.refused.append(error)
                    payload = (f"<Error><Code>{error}</Code><Message>refused by the verifying front"
                               "</Message></Error>").encode()
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(backend.hostname or "127.0.0.1", backend.port, timeout=30)
                try:
                    connection.request(self.command, self.path, body=body,
                                       headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP})
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="sigv4-front", daemon=True).start()
        return self

    def rotate(self) -> None:
        """From now on refuse every URL signed before this second, as storage does once the
        credentials that signed them are rotated away (X-Amz-Date has one-second resolution)."""
        self.not_before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.backend.stop()

    def __enter__(self) -> VerifyingS3:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
