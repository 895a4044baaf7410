"""gpuroute_dev: the development-only side of the repository (local environment and demo).

Tests, benchmarks and `gpuroute demo` use it; neither production image installs it, and
gpuroute, gpuroute_operator and gpuroute_worker never import it (an import-linter contract),
apart from the demo subcommand's lazy import in :mod:`gpuroute.cli`.
"""

from __future__ import annotations
