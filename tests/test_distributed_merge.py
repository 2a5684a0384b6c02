"""The coordinator's merge on sharded weights, on a real local Ray cluster: the same result as
warp_ray.merge in one process, tasks placed in the learners' placement groups, and the
sharded checkpoints it writes."""

from __future__ import annotations

import json
import math
import os

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import perturbed, tiny_gpt2
from warp_ray import merge
from warp_ray.checkpoint import INDEX_FILE, load_model_weights, save_model, weight_layout
from warp_ray.coordinator import distributed_merge
from warp_ray.learner.learner import Learner
from warp_ray.shards import join, partition, put_folder, split


class ShardHost:
    """Hosts shard work as a learner does (`Learner.apply`), without its engines and ranks."""

    apply = Learner.apply


RemoteShardHost = ray.remote(num_cpus=0)(ShardHost)


@pytest.fixture
def folder(tmp_path, tokenizer):
    tiny_gpt2().save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    return tmp_path / "init"


def test_partition_covers_every_tensor_once_in_order_in_balanced_shards(folder):
    tensors = weight_layout(folder)
    layout = partition(folder, 3)
    assert [n for shard in layout for n in shard] == list(tensors)
    size = {n: info.dtype.itemsize * math.prod(info.shape) for n, info in tensors.items()}
    sizes = [sum(size[n] for n in shard) for shard in layout]
    largest = max(size.values())
    assert len(layout) == 3 and max(sizes) - min(sizes) <= 2 * largest
    assert len(partition(folder, 10_000)) == len(tensors)  # never an empty shard


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_sharded_slerp_and_liti_equal_the_in_process_merge(folder, ray_cluster, weights):
    layout = partition(folder, 3)
    init_weights = load_model_weights(folder)
    models = [perturbed(tiny_gpt2(), seed) for seed in (1, 2, 3)]
    policies = [{k: v for k, v in m.state_dict().items() if k in init_weights} for m in models]
    init = put_folder(folder, layout)
    # Ray tasks, then 2 processes taking shard j mod 2
    for hosts in (
        None,
        [RemoteShardHost.remote() for _ in range(2)],
    ):
        merged = distributed_merge.slerp(
            init, [[ray.put(s) for s in split(p, layout)] for p in policies], weights, hosts
        )
        next_init = distributed_merge.liti(init, merged, 0.3, hosts)
        expected = merge.slerp(init_weights, policies, weights)
        for got, want in (
            (join(ray.get(merged)), expected),
            (join(ray.get(next_init)), merge.liti(init_weights, expected, 0.3)),
        ):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    assert len({ray.get(h.apply.remote(os.getpid)) for h in hosts}) == 2


def test_a_sharded_checkpoint_is_a_hugging_face_folder_with_its_index(folder, tmp_path):
    weights, layout = load_model_weights(folder), partition(folder, 3)
    out = tmp_path / "out"
    out.mkdir()
    save_model(iter(split(weights, layout)), folder, out, count=3)
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, t in weights.items():
        assert torch.equal(loaded[name], t), name
    assert load_model_weights(out, {layout[1][0]}).keys() == {layout[1][0]}


def test_float32_policies_merge_into_a_bfloat16_init_in_its_dtype():
    torch.manual_seed(0)
    init = {"w": torch.randn(64, 8).bfloat16(), "ids": torch.arange(4)}
    models = [{"w": init["w"].float() + 0.1 * torch.randn(64, 8), "ids": torch.arange(4)} for _ in range(2)]
    grams = merge.task_vector_grams(init, models)
    assert grams.keys() == {"w"}  # integer tensors have no task vector
    merged = merge.combine_task_vectors(init, models, {k: merge.slerp_coefficients(g) for k, g in grams.items()})
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["ids"], init["ids"])
    expected = merge.slerp({"w": init["w"].float()}, [{"w": m["w"]} for m in models])["w"].bfloat16()
    torch.testing.assert_close(merged["w"], expected)
