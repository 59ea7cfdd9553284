"""EPLB placement (pure functions) and the expert-load window."""

from __future__ import annotations

import random

import pytest
import torch

from common.engine.eplb import (
    balanced_packing,
    identity_placement,
    imbalance,
    place_layer,
    place_layer_hierarchical,
    rank_loads,
    rebalance,
    replicate_experts,
)
from common.engine.expert_load import ExpertLoadTracker


def _skewed(num_experts: int, seed: int) -> list[float]:
    """Zipf-like: a few experts get most tokens."""
    rng = random.Random(seed)
    load = [1000.0 / (i + 1) ** 1.5 + rng.random() for i in range(num_experts)]
    rng.shuffle(load)
    return load


@pytest.mark.parametrize("experts,ranks,redundant", [(8, 4, 0), (8, 4, 4), (16, 4, 8), (6, 3, 3), (64, 8, 16)])
def test_every_expert_placed_and_slots_respected(experts, ranks, redundant):
    load = _skewed(experts, seed=experts + redundant)
    layout = place_layer(load, ranks, redundant)
    assert len(layout) == experts + redundant
    assert set(layout) == set(range(experts))
    replicas = replicate_experts(load, experts + redundant)
    assert [layout.count(e) for e in range(experts)] == replicas
    assert sum(rank_loads(load, layout, ranks)) == pytest.approx(sum(load))


def test_replicas_go_to_the_highest_load_per_replica():
    assert replicate_experts([10.0, 1.0, 1.0, 1.0], 7) == [4, 1, 1, 1]
    assert replicate_experts([10.0, 6.0, 1.0, 1.0], 6) == [2, 2, 1, 1]  # 10/2=5 < 6: then expert 1
    with pytest.raises(ValueError, match="cannot hold"):
        replicate_experts([1.0, 1.0, 1.0], 2)


def test_packing_fills_every_pack_exactly_and_balances():
    weights = [9.0, 8.0, 7.0, 3.0, 2.0, 1.0]
    packs = balanced_packing(weights, 3)
    assert sorted(packs.count(p) for p in range(3)) == [2, 2, 2]
    loads = [sum(w for w, p in zip(weights, packs) if p == q) for q in range(3)]
    assert max(loads) - min(loads) <= 2.0
    with pytest.raises(ValueError, match="evenly"):
        balanced_packing(weights, 4)


@pytest.mark.parametrize("seed", range(5))
def test_balance_improves_on_skewed_load(seed):
    experts, ranks, redundant = 32, 8, 8
    load = _skewed(experts, seed)
    naive = list(range(experts)) + list(range(redundant))  # contiguous layout, no thought for load
    naive_imbalance = imbalance(rank_loads(load, naive[:experts], ranks))
    balanced = imbalance(rank_loads(load, place_layer(load, ranks, redundant), ranks))
    no_redundancy = imbalance(rank_loads(load, place_layer(load, ranks, 0), ranks))
    assert balanced < naive_imbalance
    assert balanced <= no_redundancy + 1e-9
    assert balanced < 1.3


def test_deterministic():
    loads = [_skewed(16, seed=s) for s in range(3)]
    assert rebalance(loads, 4, 4) == rebalance([list(x) for x in loads], 4, 4)
    assert rebalance(loads, 4, 4, num_groups=4, num_nodes=2) == rebalance(loads, 4, 4, num_groups=4, num_nodes=2)


def test_hierarchical_keeps_groups_on_one_node():
    experts, groups, nodes, ranks, redundant = 16, 4, 2, 4, 4
    load = _skewed(experts, seed=3)
    layout = place_layer_hierarchical(load, ranks, redundant, groups, nodes)
    assert set(layout) == set(range(experts)) and len(layout) == experts + redundant
    per_node = len(layout) // nodes
    group_size = experts // groups
    for node in range(nodes):
        node_groups = {e // group_size for e in layout[node * per_node:(node + 1) * per_node]}
        assert len(node_groups) == groups // nodes  # whole groups, none split across nodes
    assert imbalance(rank_loads(load, layout, ranks)) < imbalance(rank_loads(load, list(range(experts)), ranks))
    with pytest.raises(ValueError, match="hierarchical"):
        place_layer_hierarchical(load, ranks, redundant, 3, nodes)


def test_global_policy_when_nodes_do_not_divide_groups():
    loads = [_skewed(12, seed=1)]
    assert rebalance(loads, 4, 4, num_groups=3, num_nodes=2) == rebalance(loads, 4, 4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divide"):
        place_layer([1.0] * 8, 3, 0)
    with pytest.raises(ValueError, match="divide"):
        rebalance([[1.0] * 8], 0, 0)


def test_identity_placement_holds_every_expert_in_order():
    placement = identity_placement(2, 8, 4, 4)
    assert placement.slots_per_rank == 3
    for layout in placement.slot_to_expert:
        assert set(layout) == set(range(8)) and len(layout) == 12


def test_tracker_window_slides_and_resets_slots_on_placement_change():
    tracker = ExpertLoadTracker(num_layers=2, num_experts=4, num_slots=4, window_steps=3)
    for step in range(5):
        counts = torch.tensor([step, 0, 1, 0])
        tracker.record(0, counts, counts)
        tracker.record(1, counts * 2, counts * 2)
        tracker.end_step()
    # the last 3 steps: 2, 3, 4
    assert tracker.expert_load() == [[9.0, 0.0, 3.0, 0.0], [18.0, 0.0, 6.0, 0.0]]
    summary = tracker.summary(num_ranks=2)
    assert summary["steps_in_window"] == 3
    # rank 0 = slots 0-1 (9 + 18 tokens), rank 1 = slots 2-3 (3 + 6); per layer peaks 9 + 18, means 6 + 12
    assert summary["rank_tokens"] == [27, 9]
    assert summary["rank_load_imbalance"] == pytest.approx(27 / 18)
    tracker.placement_changed()
    assert tracker.summary(num_ranks=2)["rank_tokens"] == [0, 0]
    assert tracker.summary(num_ranks=2)["rank_load_imbalance"] == 1.0
    assert tracker.expert_load()[0][0] == 9.0  # logical load survives a re-placement
    with pytest.raises(ValueError, match="window"):
        ExpertLoadTracker(1, 4, 4, window_steps=0)
