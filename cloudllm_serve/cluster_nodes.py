"""The Ray cluster's nodes as the fleet view names them: by name, and which were lost.

Nodes of one machine (or behind one NAT) share an IP address, so replicas are placed by
node id, which Serve's replica details carry, and named by the node's name
(``ray start --node-name``; Ray's default is the node's IP address). A node is *lost*
when Ray marked it dead for any reason but a deliberate stop (``ray stop``, an
autoscaler's idle drain) and no live node has its name: once a node of that name joins
again, nothing is lost any more.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Ray's ``NodeDeathInfo`` reasons of a node stopped on purpose (by name or number).
DELIBERATE_DEATHS = frozenset({"EXPECTED_TERMINATION", "AUTOSCALER_DRAIN_IDLE", "1", "4"})


@dataclass(frozen=True)
class ClusterNode:
    """One node of Ray's node table."""

    node_id: str
    name: str
    alive: bool
    resources: dict[str, float] = field(default_factory=dict)
    death_reason: str = ""

    @property
    def public_name(self) -> str:
        """The name, unless it is an IP address (Ray's default): then ``node <id prefix>``."""
        try:
            ipaddress.ip_address(self.name)
        except ValueError:
            return self.name
        return f"node {self.node_id[:12]}"


def parse_nodes(table: Iterable[Mapping[str, Any]]) -> list[ClusterNode]:
    """:class:`ClusterNode` entries from ``ray.nodes()``'s dictionaries."""
    return [
        ClusterNode(
            node_id=str(entry.get("NodeID", "")),
            name=str(entry.get("NodeName") or entry.get("NodeManagerAddress") or ""),
            alive=bool(entry.get("Alive")),
            resources={k: float(v) for k, v in (entry.get("Resources") or {}).items()},
            death_reason=str(entry.get("DeathReason", "") or ""),
        )
        for entry in table
    ]


def read_nodes() -> list[ClusterNode]:
    """The connected cluster's nodes (a blocking GCS call: run it off the event loop)."""
    import ray

    if not ray.is_initialized():
        return []
    return parse_nodes(ray.nodes())  # type: ignore[no-untyped-call]


def lost_nodes(nodes: Iterable[ClusterNode]) -> list[ClusterNode]:
    """Dead nodes not stopped on purpose whose name no live node has (one per name)."""
    nodes = list(nodes)
    alive = {node.name for node in nodes if node.alive}
    lost: dict[str, ClusterNode] = {}
    for node in nodes:
        if node.alive or node.name in alive or node.death_reason in DELIBERATE_DEATHS:
            continue
        lost.setdefault(node.name, node)
    return list(lost.values())


def node_names(nodes: Iterable[ClusterNode]) -> dict[str, str]:
    """Node id to node name."""
    return {node.node_id: node.name for node in nodes}
