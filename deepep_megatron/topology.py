"""Which ranks of an expert-parallel group share a node (NVLink) and which are on other nodes (RDMA).

A Buffer's group is split into nodes of ``ranks_per_node`` consecutive ranks. Ranks per node come,
in this order, from ``DEEPEP_MEGATRON_RANKS_PER_NODE`` (an override, e.g. ``2`` to run 4 ranks as
2 virtual nodes x 2 on one GPU), torchrun's ``LOCAL_WORLD_SIZE``, SLURM's ``SLURM_NTASKS_PER_NODE``,
else every rank is on one node. Launchers place ranks node by node (rank = node * per_node + local),
which is what the split assumes; an EP group that is a subgroup of the world takes its members'
global ranks to find their nodes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch.distributed as dist

RANKS_PER_NODE_ENV = "DEEPEP_MEGATRON_RANKS_PER_NODE"
#: GPUs per node the design serves: single-GPU nodes, 2- and 4-GPU nodes or trays, 8-GPU servers.
SUPPORTED_RANKS_PER_NODE = (1, 2, 4, 8)


@dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks in nodes of ``ranks_per_node`` consecutive ranks."""

    num_ranks: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.ranks_per_node <= 0 or self.num_ranks % self.ranks_per_node != 0:
            raise ValueError(
                f"{self.num_ranks} ranks do not split into nodes of {self.ranks_per_node}; set "
                f"{RANKS_PER_NODE_ENV} to a divisor of the group size"
            )

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node


def world_ranks_per_node(world_size: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """Ranks per node of the world, from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    for name in (RANKS_PER_NODE_ENV, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        raw = env.get(name)
        if not raw:
            continue
        match = re.fullmatch(r"\s*(\d+)(\(x\d+\))?\s*", raw)  # SLURM writes "8(x2)" for 2 nodes of 8
        if match is None or int(match.group(1)) <= 0:
            raise ValueError(f"{name}={raw!r} must be a positive number of ranks per node")
        per_node = int(match.group(1))
        if name == RANKS_PER_NODE_ENV and per_node not in SUPPORTED_RANKS_PER_NODE:
            raise ValueError(f"{RANKS_PER_NODE_ENV}={raw!r} must be one of {SUPPORTED_RANKS_PER_NODE}")
        if world_size % per_node != 0:
            raise ValueError(f"{name}={raw!r} does not divide the world size {world_size} into whole nodes")
        return per_node
    return world_size


def group_topology(group: dist.ProcessGroup, environ: Optional[Mapping[str, str]] = None) -> Topology:
    """The node split of ``group``: its members' global ranks grouped by the world's nodes. Every node
    the group touches must hold the same number of its ranks, in group-rank order."""
    per_node_world = world_ranks_per_node(dist.get_world_size(), environ)
    members = dist.get_process_group_ranks(group)
    nodes = [r // per_node_world for r in members]
    counts = {n: nodes.count(n) for n in dict.fromkeys(nodes)}
    per_node = next(iter(counts.values()))
    if len(set(counts.values())) != 1 or nodes != sorted(nodes):
        raise ValueError(
            f"the EP group (global ranks {members}) spreads unevenly over nodes of {per_node_world} ranks "
            f"({counts}); give every node the same number of consecutive EP ranks"
        )
    return Topology(len(members), per_node)
