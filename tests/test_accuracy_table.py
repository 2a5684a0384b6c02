"""The accuracy table's tasks (warp_ray/reward/warm.py): which models score whole and which in
shards, and the shards' scores put back in the pairs' order. Its end-to-end run is in
tests/test_warm.py."""

from __future__ import annotations

import itertools

import torch

from warp_ray.reward.warm import joined, scoring_shards


def test_whole_waves_first_then_the_models_left_over_in_shards_filling_the_last():
    assert scoring_shards(5, 2) == [(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 2), (4, 1, 2)]
    assert scoring_shards(5, 4) == [(m, 0, 1) for m in range(4)] + [(4, k, 4) for k in range(4)]
    assert scoring_shards(4, 2) == [(m, 0, 1) for m in range(4)]
    assert scoring_shards(5, 32) == [(m, 0, 1) for m in range(5)]  # fewer models than slots: not cut
    for models, slots in itertools.product(range(1, 12), range(1, 12)):
        tasks, whole = scoring_shards(models, slots), models - models % slots
        assert tasks[:whole] == [(m, 0, 1) for m in range(whole)]
        assert len(tasks) - whole <= slots  # the rest in one wave: at most one more load per slot
        for m in range(models):  # every model once: whole, or in shards 0..n-1 of n
            parts = [(k, n) for j, k, n in tasks if j == m]
            assert parts == [(k, parts[0][1]) for k in range(parts[0][1])]


def test_shards_are_put_back_in_the_pairs_order():
    for pairs, n in itertools.product(range(12), range(1, 6)):  # lengths that n does not divide, empty shards
        chosen, rejected = torch.arange(pairs, dtype=torch.float), -torch.arange(pairs, dtype=torch.float)
        shards = [{"train": (chosen[k::n], rejected[k::n]), "ood": (chosen[k::n], chosen[k::n])} for k in range(n)]
        whole = joined(shards)
        assert torch.equal(whole["train"][0], chosen) and torch.equal(whole["train"][1], rejected)
        assert torch.equal(whole["ood"][1], chosen)
