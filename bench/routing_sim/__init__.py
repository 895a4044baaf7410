"""Routing simulation (issues #3, #9): the operator's own Dispatcher against a synthetic trace.

`python -m bench.routing_sim [JOBS] [SEED]` replays one trace under every policy below and
prints Markdown tables. For gpuroute the simulation drives the operator's dispatcher
directly (`gpuroute_operator.core.dispatcher.Dispatcher`, the code the operator runs), with
no copy of any of its rules; it replaces only the clock, the network, the GPUs and storage
signing. The baselines (round-robin, round-robin + failover, MultiKueue first-to-admit and
all-at-once) run on the same trace, the same pools and the same per-job service-time noise.
Two scenarios: the failed pool returns at RECOVER_AT_S, or never does; a third section
checks the router's own numbers and runs two counterfactuals.

One module per part, each with its own part of the description:

- `scenario`: the pools, which one fails and when, the liveness rule (`Scenario`, `POOLS`);
- `trace`: the synthetic ImageJobs every policy replays (`make_trace`, `TraceJob`);
- `kernel`: the event loop, attempts on simulated GPUs, outcomes, cost and the summary row
  every policy shares (`Simulation`, `SimJob`, `Attempt`);
- `gpuroute_adapter`: the adapter that drives the operator's real Dispatcher (`GpurouteSim`, its
  effects port `SimEffects`, `CounterfactualPlacer`);
- `baselines`: round-robin (with and without failover) and the two MultiKueue variants;
- `experiment`: every policy over both scenarios, the router checks (`run`, `POLICIES`);
- `report`: the Markdown tables (`markdown`);
- `__main__`: the command line.
"""

from __future__ import annotations

from bench.routing_sim.baselines import MultiKueueSim, RoundRobinSim
from bench.routing_sim.experiment import POLICIES, run
from bench.routing_sim.gpuroute_adapter import TICK_S, CounterfactualPlacer, GpurouteSim, SimEffects
from bench.routing_sim.kernel import SimJob, Simulation
from bench.routing_sim.report import markdown
from bench.routing_sim.scenario import FAIL_AT_S, FAILING, POOLS, RECOVER_AT_S, PoolModel, Scenario
from bench.routing_sim.trace import TraceJob, make_trace

__all__ = [
    "FAILING", "FAIL_AT_S", "POLICIES", "POOLS", "RECOVER_AT_S", "TICK_S", "CounterfactualPlacer", "GpurouteSim",
    "MultiKueueSim", "PoolModel", "RoundRobinSim", "Scenario", "SimEffects", "SimJob", "Simulation", "TraceJob",
    "make_trace", "markdown", "run",
]
