"""`gpuroute demo`: the whole ImageJob path on one machine.

Starts a real etcd + kube-apiserver with the CRDs, a moto S3 server, two operator
replicas (leader election on a Lease) and the worker processes of one pool (CURVE keys
generated on the spot), uploads photographs bundled with scikit-image, applies the
manifests in examples/, waits for every job, prints a timing table, saves the outputs,
and exits non-zero unless all completed.
"""

from __future__ import annotations

import io
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig
from gpuroute_dev.localenv.objectstore import S3Server
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

BUCKET = "gpuroute-demo"
NAMESPACE = "demo"
POOL = "local-pool"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "camera")
GENERATED = 20
"""Synthetic images uploaded next to the photographs, for the batch example."""
COLUMNS = ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs", "totalMs")


def _sample_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _generated_png(index: int) -> bytes:
    """A small synthetic image (gradient plus noise), so the batch example has more than a handful of items."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (120, 1)), np.tile(ramp[::-1], (120, 1)),
                       np.full((120, 160), 40.0 * (index % 6))], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def load_examples(folder: Path = EXAMPLES) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        jobs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "ImageJob")
    return jobs


def format_table(jobs: dict[str, dict[str, Any]]) -> str:
    header = ("job", "phase", "pool", "worker", "attempts", *(c.removesuffix("Ms") + " ms" for c in COLUMNS))
    rows = [header]
    for name in sorted(jobs):
        status = jobs[name].get("status") or {}
        timing = status.get("timing") or {}
        rows.append((name, status.get("phase", "?"), status.get("pool", ""), status.get("worker", ""),
                     str(status.get("attempts", 0)), *(f"{timing[c]:.1f}" if c in timing else "-" for c in COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 5 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(*, workdir: str | None, output_dir: str, keep_running: bool, workers: int = 2, operators: int = 2) -> int:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gpuroute-demo-"))
    print(f"gpuroute demo: state and logs in {root}")
    started = time.monotonic()
    with ControlPlane(ControlPlaneConfig(workdir=root / "control-plane", name="gpuroute-demo")) as cp, S3Server() as s3:
        print(f"  control plane up ({cp.server}) and CRDs installed in {time.monotonic() - started:.1f}s")
        s3.create_bucket(BUCKET)
        for name in SAMPLES:
            s3.client().put_object(Bucket=BUCKET, Key=f"inputs/{name}.png", Body=_sample_png(name))
        for index in range(GENERATED):
            s3.client().put_object(Bucket=BUCKET, Key=f"inputs/generated/gradient-{index:02d}.png",
                                   Body=_generated_png(index))
        print(f"  moto S3 at {s3.endpoint_url}: uploaded {len(SAMPLES)} photographs and {GENERATED} generated "
              f"images to s3://{BUCKET}/inputs/")
        stack = LocalStack(root / "stack", cp, s3)
        try:
            stack.ensure_namespace(NAMESPACE, read=[f"s3://{BUCKET}/inputs/"], write=[f"s3://{BUCKET}/outputs/"])
            names = [f"w{i + 1}" for i in range(workers)]
            stack.add_pool(PoolConfig(POOL, cloud="local", region="local-1", price_per_gpu_hour=0.0, workers=tuple(names)))
            # Two replicas contend for a Lease, as the Deployment runs them; only the
            # leader binds the endpoint the workers dial.
            stack.start_operator(replicas=operators)
            for name in names:
                stack.start_worker(POOL, name)
            leader = stack.wait_for_leader() if operators > 1 else "operator-1"
            stack.wait_for_pool(POOL, workers=workers, timeout=90)
            print(f"  operator on {stack.operator_endpoint} (CURVE), {operators} replica(s), {leader} leads; "
                  f"{workers} workers joined pool {POOL}")
            examples = load_examples()
            for job in examples:
                stack.custom.create_namespaced_custom_object("gpuroute.io", "v1alpha1", NAMESPACE, "imagejobs", job)
            print(f"  applied {len(examples)} ImageJobs from {EXAMPLES.name}/; waiting...")
            jobs = stack.wait_for_jobs(NAMESPACE, [j["metadata"]["name"] for j in examples], timeout=300)
            print()
            print(format_table(jobs))
            print()
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            failed = []
            for name, body in sorted(jobs.items()):
                status = body.get("status") or {}
                if status.get("phase") != "Completed":
                    failed.append(f"{name}: {status.get('phase')} {status.get('reason')}: {status.get('message')}")
                    continue
                if "items" in status:  # a batch: its outputs are listed in its results manifest
                    items = status["items"]
                    print(f"batch {name}: {status.get('progress')} items, {items.get('succeeded')} succeeded, "
                          f"{items.get('failed')} failed; manifest {status.get('results')}")
                    key = str(status.get("results", "")).split(f"s3://{BUCKET}/", 1)[-1]
                    manifest = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
                    (out / f"{name}.results.jsonl").write_bytes(manifest)
                    continue
                key = status["output"]["uri"].split(f"s3://{BUCKET}/", 1)[1]
                (out / Path(key).name).write_bytes(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
            print(f"outputs saved in {out.resolve()}/")
            for line in failed:
                print(f"NOT COMPLETED {line}", file=sys.stderr)
            if keep_running:
                print(f"\nStatus page and API: http://127.0.0.1:{stack.operator_web_port}/ (sign in with a bearer "
                      f"token the API server accepts, e.g. the admin token in {cp.kubeconfig}); "
                      f"Prometheus metrics: http://127.0.0.1:{stack.operator_metrics_port}/metrics")
                _wait_for_interrupt(cp.kubeconfig)
            return 1 if failed else 0
        finally:
            stack.stop()
            if not workdir and not keep_running:
                shutil.rmtree(root, ignore_errors=True)


def _wait_for_interrupt(kubeconfig: str) -> None:
    print(f"\nEverything stays up. In another shell:\n  export KUBECONFIG={kubeconfig}\n"
          f"  kubectl get ij -n {NAMESPACE}\n  kubectl apply -n {NAMESPACE} -f examples/\n"
          "Press Ctrl-C to stop.")
    stop = False

    def handler(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop:
        time.sleep(0.5)
