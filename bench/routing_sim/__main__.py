"""`python -m bench.routing_sim [JOBS] [SEED]`: run every policy and print the Markdown report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bench.routing_sim.experiment import run
from bench.routing_sim.report import markdown


def main(argv: Sequence[str]) -> None:
    # Each simulated pool failure makes the dispatcher log one warning per lost worker, per run.
    for module in ("gpuroute_operator.core.dispatcher", "gpuroute_operator.core.sessions"):
        logging.getLogger(module).setLevel(logging.ERROR)
    jobs = int(argv[1]) if len(argv) > 1 else 10_000
    seed = int(argv[2]) if len(argv) > 2 else 0
    print(markdown(run(jobs=jobs, seed=seed)))


if __name__ == "__main__":
    main(sys.argv)
