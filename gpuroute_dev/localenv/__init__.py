"""Local stand-ins for the cloud pieces gpuroute talks to, for tests, CI and the demo.

- :mod:`gpuroute_dev.localenv.controlplane`: real etcd and kube-apiserver processes on free
  loopback ports (the envtest approach), with the project's CRDs installed.
- :mod:`gpuroute_dev.localenv.objectstore`: moto's S3 in server mode (real HTTP, boto3
  unchanged).

The submodules are not imported here, so importing one does not pull in the other's
dependencies (the kubernetes client, moto).
"""

from __future__ import annotations

__all__ = ["controlplane", "objectstore"]
