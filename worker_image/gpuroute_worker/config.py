"""Worker configuration, parsed once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpuroute.protocol import routing_nonce
from gpuroute_worker.transfer import TransferConfig


@dataclass(frozen=True)
class ModelSpec:
    """A super-resolution model this worker serves."""

    name: str
    """Name jobs use in `upscale.model`."""
    uri: str
    """Local path, s3:// or https:// location of the weights (.pth, Real-ESRGAN format)."""
    sha256: str
    """Expected hex digest of the weights file; a mismatch refuses to load."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to join a pool."""

    operator_endpoint: str
    """ZeroMQ endpoint of the operator's ROUTER socket, e.g. tcp://operator:7700; empty with listen_endpoint."""
    pool: str
    """Name of the WorkerPool this worker belongs to (must match its key's pool)."""
    worker_id: str
    """Unique id within the pool; the pod name in Kubernetes."""
    secret_key: bytes
    """This worker's CURVE secret key (Z85); the public half is derived."""
    server_public_key: bytes
    """The operator's CURVE public key (Z85), pinned: no other server is trusted."""
    listen_endpoint: str = ""
    """When set, bind here (tcp://0.0.0.0:7701) and wait for the operator to dial in, for pools
    that list `endpoints`; operator_endpoint is then unused."""
    capacity: int = 4
    """Jobs accepted at once; the operator never sends more."""
    max_batch: int = 8
    """Largest batch the GPU executor forms from compatible jobs."""
    max_batch_wait_ms: float = 5.0
    """How long the executor waits for a batch to fill before running it."""
    device: str = "auto"
    """torch device: auto picks cuda when present, else cpu."""
    nvjpeg: bool = True
    """Decode plain JPEGs on the GPU with nvJPEG when torchvision is installed (gpuroute_worker.nvjpeg)."""
    max_input_bytes: int = 64 * 1024 * 1024
    """Largest encoded input accepted."""
    max_input_pixels: int = 64_000_000
    """Largest decoded input (width x height) accepted; guards against decompression bombs."""
    max_output_pixels: int = 268_000_000
    """Largest output a pipeline may produce (16384 x 16384)."""
    transfer_timeout_s: float = 60.0
    """Longest silence on an open storage connection (per-read timeout)."""
    transfer_total_timeout_s: float = 300.0
    """Whole transfer, retries included; also capped by the job's remaining time."""
    transfer_retries: int = 3
    """Extra attempts of a storage transfer after a connection error, 5xx or throttling."""
    transfer_ca_file: str | None = None
    """PEM bundle trusted for storage instead of the system's (private endpoints, tests)."""
    max_working_bytes: int | None = None
    """Memory one image's pipeline may use at its largest step (float32 working copies);
    None: 4 GiB on the CPU, 60% of the device's memory on a GPU. Checked before any step runs."""
    result_cache_size: int = 1024
    """Recent results kept by job id, so a re-sent job is answered, not recomputed."""
    health_port: int | None = 8081
    """Port of /healthz and /metrics; None disables the HTTP server."""
    torch_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    """Super-resolution models served, by name."""
    gpu_name: str = ""
    """Filled at start-up from the device (e.g. 'NVIDIA H100 80GB HBM3' or 'cpu')."""
    routing_nonce: str = field(default_factory=routing_nonce)
    """The secret part of this process's routing id (protocol.routing_id_for): the same across
    reconnects, so the operator recognises the worker, and known to nobody else."""


def transfer_config(config: WorkerConfig) -> TransferConfig:
    """The storage client's settings: one keep-alive connection per concurrent job."""
    return TransferConfig(pool_size=max(1, config.capacity), read_timeout_s=config.transfer_timeout_s,
                          connect_timeout_s=min(10.0, config.transfer_timeout_s),
                          total_timeout_s=config.transfer_total_timeout_s, retries=config.transfer_retries,
                          ca_file=config.transfer_ca_file)
