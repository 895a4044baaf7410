"""Image operations as torch tensor code, the same on CPU and GPU.

The worker runtime uses run_pipeline, output_shape and the two error types; the op
modules (resample, enhance, filters, transforms) hold one family each.
"""

from __future__ import annotations

from gpuroute_worker.ops.errors import OpError, OutOfMemory
from gpuroute_worker.ops.pipeline import output_shape, run_pipeline

__all__ = ["OpError", "OutOfMemory", "output_shape", "run_pipeline"]
