"""Ray placement groups that fail fast: check the bundles against the cluster first.

Ray accepts a placement group that can never be satisfied and leaves it pending
for ever (and Ray Serve repeats "taken more than 30s to be scheduled" for a
replica whose bundles do not fit). Before a group is made, :func:`infeasibility`
compares the bundles with the resources of the cluster's alive nodes and names
the reason a group can *never* fit; :func:`create_placement_group` raises that at
once, and otherwise waits at most ``timeout_s`` (logging progress) for a group
that fits in total but not yet, then removes it and raises the same kind of
message. The checks are conservative: only a certain misfit is refused (an
autoscaling cluster that would grow is not predicted).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from shoal.errors import PlacementError

logger = logging.getLogger(__name__)

Bundle = dict[str, float]
PROGRESS_INTERVAL_S = 5.0


def _fits(bundle: Bundle, resources: Bundle) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def _total(bundles: Sequence[Bundle]) -> Bundle:
    total: Bundle = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _show(resources: Bundle) -> str:
    keys = [k for k in sorted(resources) if k in ("CPU", "GPU") or not k.startswith(
        ("node:", "memory", "object_store_memory", "accelerator_type")) and "_group_" not in k]
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}"


def infeasibility(bundles: Sequence[Bundle], strategy: str,
                  nodes: Sequence[Bundle]) -> str | None:
    """Why ``bundles`` can never be placed on nodes with these total resources, or None."""
    if not nodes:
        return "the cluster has no alive nodes"
    need = _total(bundles)
    have = _total(nodes)
    short = [k for k, v in need.items() if v > 0 and have.get(k, 0.0) + 1e-9 < v]
    if short:
        return "; ".join(f"they need {k} {need[k]:g} in total but the cluster has "
                         f"{have.get(k, 0.0):g}" for k in short)
    for index, bundle in enumerate(bundles):
        if not any(_fits(bundle, node) for node in nodes):
            return f"bundle {index} {_show(bundle)} fits on no single node"
    if strategy == "STRICT_PACK" and not any(_fits(need, node) for node in nodes):
        return f"STRICT_PACK needs one node with {_show(need)}"
    if strategy == "STRICT_SPREAD":
        fitting = sum(any(_fits(b, node) for b in bundles) for node in nodes)
        if fitting < len(bundles):
            return f"STRICT_SPREAD needs {len(bundles)} nodes, only {fitting} can hold a bundle"
    return None


def cluster_nodes(ray: Any) -> list[Bundle]:
    """Total resources of each alive node."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def placement_message(bundles: Sequence[Bundle], strategy: str, reason: str,
                      nodes: Sequence[Bundle], available: Bundle, hint: str) -> str:
    """The error a user sees: what was asked, what exists, what to change."""
    shown = ", ".join(_show(b) for b in bundles)
    return (f"Ray cannot place {len(bundles)} bundles [{shown}] ({strategy}): {reason}. "
            f"Cluster: {len(nodes)} node(s) {[_show(n) for n in nodes]}, free now "
            f"{_show(available)}. {hint}")


def check_placement(ray: Any, bundles: Sequence[Bundle], strategy: str, hint: str) -> None:
    """Raise PlacementError at once when ``bundles`` can never fit this cluster."""
    nodes = cluster_nodes(ray)
    reason = infeasibility(bundles, strategy, nodes)
    if reason is not None:
        raise PlacementError(placement_message(bundles, strategy, reason, nodes,
                                               ray.available_resources(), hint))


def create_placement_group(ray: Any, bundles: Sequence[Bundle], strategy: str,
                           timeout_s: float, hint: str) -> Any:
    """A ready placement group, or PlacementError (at once if infeasible, else after the wait).

    Args:
        hint: what the user can change (flags), appended to the message.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    check_placement(ray, bundles, strategy, hint)
    group = placement_group([dict(b) for b in bundles], strategy=strategy)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if group.wait(timeout_seconds=max(0.1, min(PROGRESS_INTERVAL_S, left))):
            return group
        if time.monotonic() >= deadline:
            break
        logger.warning("waiting for Ray to place %d bundles (%s): %.0f s left; free now %s",
                       len(bundles), strategy, max(0.0, deadline - time.monotonic()),
                       _show(ray.available_resources()))
    remove_placement_group(group)  # nothing stays pending in `ray status`
    reason = f"the cluster has the resources in total but did not free them within {timeout_s:g} s"
    raise PlacementError(placement_message(bundles, strategy, reason, cluster_nodes(ray),
                                           ray.available_resources(),
                                           hint + " Or wait longer: --placement-timeout."))


__all__ = ["check_placement", "cluster_nodes", "create_placement_group", "infeasibility",
           "placement_message"]
