"""Expert-parallel load balancing (DeepSeek's EPLB algorithm), as pure functions.

Input: the measured load of every logical expert of every MoE layer (tokens routed to it over a
recent window). Output: per layer, a layout of ``num_experts + num_redundant`` physical slots,
rank-major (slot ``s`` lives on rank ``s // slots_per_rank``), each slot holding one logical expert.

Per layer:
1. replicate: every expert gets one slot; each redundant slot goes to the expert whose load per
   replica is currently highest;
2. pack: replicas (weight = expert load / its replica count) are placed heaviest first onto the
   least-loaded rank that still has a free slot.
Hierarchical variant (when ``num_groups`` expert groups divide evenly over ``num_nodes`` nodes):
groups are first packed onto nodes by group load, keeping a group's experts on one node, then
steps 1-2 run inside each node over that node's ranks.

Ties break by index, so the result is a deterministic function of the load.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ExpertPlacement",
    "replicate_experts",
    "balanced_packing",
    "place_layer",
    "place_layer_hierarchical",
    "rebalance",
    "identity_placement",
    "rank_loads",
    "imbalance",
]


@dataclass(frozen=True)
class ExpertPlacement:
    """Per MoE layer, the logical expert held by each physical slot (rank-major)."""

    slot_to_expert: list[list[int]]
    num_ranks: int

    @property
    def slots_per_rank(self) -> int:
        return len(self.slot_to_expert[0]) // self.num_ranks if self.slot_to_expert else 0

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank


def replicate_experts(load: list[float], num_slots: int) -> list[int]:
    """Replica count per expert: one each, then every extra slot to the highest load per replica."""
    if num_slots < len(load):
        raise ValueError(f"{num_slots} slots cannot hold {len(load)} experts")
    replicas = [1] * len(load)
    for _ in range(num_slots - len(load)):
        best = max(range(len(load)), key=lambda e: (load[e] / replicas[e], -e))
        replicas[best] += 1
    return replicas


def balanced_packing(weights: list[float], num_packs: int) -> list[int]:
    """Pack index of each item: heaviest first onto the lightest pack with room, every pack
    taking exactly ``len(weights) / num_packs`` items."""
    if num_packs <= 0 or len(weights) % num_packs:
        raise ValueError(f"{len(weights)} items do not split evenly into {num_packs} packs")
    capacity = len(weights) // num_packs
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    assignment = [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        pack = min((p for p in range(num_packs) if pack_size[p] < capacity), key=lambda p: (pack_load[p], p))
        assignment[item] = pack
        pack_load[pack] += weights[item]
        pack_size[pack] += 1
    return assignment


def place_layer(load: list[float], num_ranks: int, num_redundant: int) -> list[int]:
    """One layer's slot layout (rank-major) for ``len(load) + num_redundant`` slots on ``num_ranks``."""
    num_slots = len(load) + num_redundant
    if num_ranks <= 0 or num_slots % num_ranks:
        raise ValueError(f"{num_slots} expert slots ({len(load)} experts + {num_redundant} redundant) "
                         f"do not divide over {num_ranks} ranks")
    replicas = replicate_experts(load, num_slots)
    items = [e for e in range(len(load)) for _ in range(replicas[e])]
    weights = [load[e] / replicas[e] for e in items]
    packs = balanced_packing(weights, num_ranks)
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for item, rank in enumerate(packs):
        per_rank[rank].append(items[item])
    return [expert for rank_experts in per_rank for expert in sorted(rank_experts)]


def place_layer_hierarchical(load: list[float], num_ranks: int, num_redundant: int,
                             num_groups: int, num_nodes: int) -> list[int]:
    """Groups of contiguous experts packed onto nodes first, then :func:`place_layer` per node."""
    experts = len(load)
    if num_groups <= 0 or experts % num_groups or num_groups % num_nodes or num_ranks % num_nodes:
        raise ValueError(f"hierarchical EPLB needs groups | experts and nodes | groups, ranks: "
                         f"experts={experts} groups={num_groups} nodes={num_nodes} ranks={num_ranks}")
    if num_redundant % num_nodes:
        raise ValueError(f"{num_redundant} redundant slots do not split over {num_nodes} nodes")
    group_size = experts // num_groups
    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of_group = balanced_packing(group_load, num_nodes)
    layout: list[int] = []
    for node in range(num_nodes):
        node_experts = [e for g in range(num_groups) if node_of_group[g] == node
                        for e in range(g * group_size, (g + 1) * group_size)]
        local = place_layer([load[e] for e in node_experts], num_ranks // num_nodes, num_redundant // num_nodes)
        layout.extend(node_experts[i] for i in local)
    return layout


def rebalance(loads: list[list[float]], num_ranks: int, num_redundant: int,
              num_groups: int = 1, num_nodes: int = 1) -> ExpertPlacement:
    """A placement for every layer's load; hierarchical when ``num_nodes > 1`` and nodes divide
    groups (else the global policy, as DeepSeek's reference does)."""
    hierarchical = num_nodes > 1 and num_groups % num_nodes == 0
    layouts = [
        place_layer_hierarchical(load, num_ranks, num_redundant, num_groups, num_nodes) if hierarchical
        else place_layer(load, num_ranks, num_redundant)
        for load in loads
    ]
    return ExpertPlacement(layouts, num_ranks)


def identity_placement(num_layers: int, num_experts: int, num_ranks: int, num_redundant: int) -> ExpertPlacement:
    """The layout before any load is known: EPLB of a uniform load (experts in order, the
    redundant slots on the first experts)."""
    return rebalance([[1.0] * num_experts] * num_layers, num_ranks, num_redundant)


def rank_loads(load: list[float], slot_to_expert: list[int], num_ranks: int) -> list[float]:
    """Modelled tokens per rank: an expert's load split evenly among its replicas."""
    replicas: dict[int, int] = {}
    for expert in slot_to_expert:
        replicas[expert] = replicas.get(expert, 0) + 1
    per_rank = len(slot_to_expert) // num_ranks
    ranks = [0.0] * num_ranks
    for slot, expert in enumerate(slot_to_expert):
        ranks[slot // per_rank] += load[expert] / replicas[expert]
    return ranks


def imbalance(loads: list[float]) -> float:
    """Peak over mean (1.0 = perfectly balanced; 1.0 for no load at all)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0
