"""gpuroute: Kubernetes-native routing of GPU image-processing jobs across clouds."""

from __future__ import annotations

__version__ = "0.1.0"
