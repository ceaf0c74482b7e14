"""How the driver meets the Ray cluster: connecting, keeping Ray quiet, and planning the actor pool.

Imported only when a cluster run starts (it imports Ray; see :mod:`clue2geo_sdk.cluster`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import ray
import ray.data
from ray.util.debug import log_once

from ..errors import Clue2GeoError

ACTOR_WAIT_S = 600  # fail, rather than wait for ever, when the cluster cannot place the actors


class ClusterJobError(Clue2GeoError, RuntimeError):
    """The cluster job could not run or finish (actors could not start, a batch kept killing its actor)."""


@attrs.frozen(kw_only=True)
class ActorPlan:
    """How many actors, what each asks of Ray, and how it runs: GPU actors (one GPU each) when the
    cluster has GPUs, else CPU actors with a fractional CPU request (reads keep a CPU, DESIGN §9)."""

    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    n_threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def plan_actors(
    nodes: Sequence[dict[str, float]],
    *,
    actors: int | None = None,
    device: str = "auto",
    cpus_per_actor: float | None = None,
    n_threads: int | None = None,
) -> ActorPlan:
    """An :class:`ActorPlan` from the alive nodes' resources (``{"CPU": .., "GPU": ..}`` each).

    GPU: one actor per GPU (``num_gpus=1``, ``device="cuda"``). CPU: one actor per node unless
    ``actors`` says otherwise; each asks for at most one CPU and at most half its node's share, so
    the read tasks always find a CPU, and runs llama.cpp on its share of the node's threads (half
    the logical CPUs, the engines' default on one machine)."""
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if device != "cpu" and gpus >= 1:
        return ActorPlan(
            actors=actors or int(gpus), num_gpus=1.0, num_cpus=cpus_per_actor or 1.0, device="cuda", n_threads=n_threads
        )
    if device == "cuda":
        raise ClusterJobError("device cuda was asked for, but the Ray cluster has no GPU")
    cpu_nodes = [n for n in nodes if n.get("CPU", 0.0) > 0] or [{"CPU": 1.0}]
    count = actors or len(cpu_nodes)
    per_node = math.ceil(count / len(cpu_nodes))
    node_cpus = min(n["CPU"] for n in cpu_nodes)
    request = cpus_per_actor or min(1.0, node_cpus / (2 * per_node))
    threads = n_threads or max(1, int(node_cpus // 2 // per_node))  # the engines' rule, shared by the node's actors
    return ActorPlan(actors=count, num_gpus=0.0, num_cpus=request, device="cpu", n_threads=threads)


def alive_nodes() -> list[dict[str, float]]:
    """The resources (``{"CPU": .., "GPU": ..}``) of each alive node of the connected cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def connect(address: str | None, verbose: bool) -> bool:
    """Connect to (or start) a cluster; True when this call did, so the run shuts it down after."""
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    return True


def quiet_ray(verbose: bool) -> None:
    """Ray Data's settings for this run: its bars and logs only with ``verbose``, and a bounded wait
    for the actors to be placed."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    ctx.wait_for_min_actors_s = ACTOR_WAIT_S
    if not verbose:  # a failed job is reported in one line (ClusterJobError); --verbose shows Ray's traces
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        log_once("ray_data_progress_manager_disabled")  # Ray's one line saying its bars are off: we draw ours
