"""A process that contends for a Lease with gpuroute's LeaderElector, for the tests.

    python lease_holder.py KUBECONFIG NAMESPACE LEASE IDENTITY [POD_NAME [POD_IP SERVICE]]

Prints "LEADING" once it holds the Lease; on SIGTERM it releases the Lease, prints
"RELEASED" and exits 0; on lost leadership it exits 3 as the operator would (with 1).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from gpuroute_operator.kube.leader import LeaderElectionConfig, LeaderElector, LeaderService, kube_api_client


def main(kubeconfig: str, namespace: str, lease: str, identity: str, pod_name: str = "", pod_ip: str = "",
         service: str = "") -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    services = (LeaderService(service, (("zmq", 7700),)),) if service else ()
    elector = LeaderElector(kube_api_client(kubeconfig), LeaderElectionConfig(lease, namespace, identity,
                                                                                     pod_name=pod_name, pod_ip=pod_ip,
                                                                                     services=services))
    if not elector.wait_until_leading(stop):
        return 0
    print("LEADING", flush=True)

    def lost(reason: str) -> None:
        print(f"LOST {reason}", flush=True)
        os._exit(3)

    elector.start_renewing(on_lost=lost)
    stop.wait()
    elector.release()
    print("RELEASED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:8]))
