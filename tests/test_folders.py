"""Merges of Hugging Face folders: streamed, atomic, loadable by transformers, safe on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import perturbed, tiny_gpt2
from warp_ray.checkpoint import same_model
from warp_ray.errors import CheckpointError, MergeError
from warp_ray.merge import average, liti, slerp
from warp_ray.merge.folders import average_folders, liti_folders, merge_folders, slerp_folders, soup_folders
from warp_ray.merge.soup import slerp_soup, soup


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_slerp_folder_round_trip_loads_in_transformers(model_folders, tmp_path):
    out = slerp_folders(
        model_folders["init"], [model_folders["a"], model_folders["b"]], tmp_path / "merged", progress=False
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = slerp(weights(model_folders["init"]), [weights(model_folders["a"]), weights(model_folders["b"])])
    assert_same(merged.state_dict(), expected)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("the policy").input_ids
        == AutoTokenizer.from_pretrained(model_folders["init"])("the policy").input_ids
    )
    assert merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_average_and_liti_folders_match_the_in_memory_merges(model_folders, tmp_path):
    a, b, init = (weights(model_folders[k]) for k in ("a", "b", "init"))
    average_folders([model_folders["a"], model_folders["b"]], tmp_path / "avg", weights=(0.25, 0.75), progress=False)
    assert_same(weights(tmp_path / "avg"), average([a, b], weights=(0.25, 0.75)))
    liti_folders(model_folders["init"], model_folders["a"], tmp_path / "liti", eta=0.3, progress=False)
    assert_same(weights(tmp_path / "liti"), liti(init, a, 0.3))


def test_a_soup_of_folders_is_each_policy_at_its_vertex_and_the_in_memory_soup_between(model_folders, tmp_path):
    """`warp-ray merge soup`'s function: linear, or by SLERP from the policies' init."""
    policies, init = [model_folders["a"], model_folders["b"]], model_folders["init"]
    a, b = weights(policies[0]), weights(policies[1])
    for lambdas, expected in (((1.0, 0.0), a), ((0.0, 1.0), b)):
        for base in (None, init):
            out = tmp_path / f"soup_{lambdas[0]}_{base is None}"
            soup_folders(policies, out, lambdas, init=base, progress=False)
            assert all(torch.equal(t, expected[k]) for k, t in weights(out).items())
    soup_folders(policies, tmp_path / "linear", (0.4, 0.6), progress=False)
    assert_same(weights(tmp_path / "linear"), soup([a, b], (0.4, 0.6)))
    soup_folders(policies, tmp_path / "slerp", (0.4, 0.6), init=init, progress=False)
    assert_same(weights(tmp_path / "slerp"), slerp_soup(weights(init), [a, b], (0.4, 0.6)))
    with pytest.raises(MergeError, match="sum to 0.9"):
        soup_folders(policies, tmp_path / "refused", (0.4, 0.5), progress=False)
    assert not (tmp_path / "refused").exists()


def test_sharded_bf16_folders_keep_layout_and_dtype(tmp_path):
    init = tiny_gpt2().to(torch.bfloat16)
    for name, model in (("init", init), ("a", perturbed(init, 1)), ("b", perturbed(init, 2))):
        model.to(torch.bfloat16).save_pretrained(tmp_path / name, max_shard_size="20KB")
    index = json.loads((tmp_path / "init" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out = slerp_folders(tmp_path / "init", [tmp_path / "a", tmp_path / "b"], tmp_path / "out", progress=False)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    for shard in set(index["weight_map"].values()):
        tensors = load_file(out / shard)
        assert set(tensors) == {k for k, v in index["weight_map"].items() if v == shard}
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same(
        merged.state_dict(), slerp(weights(tmp_path / "init"), [weights(tmp_path / "a"), weights(tmp_path / "b")])
    )


def test_output_is_atomic_and_a_failed_merge_keeps_the_previous_one(model_folders, tmp_path):
    out = tmp_path / "merged"
    slerp_folders(model_folders["init"], [model_folders["a"]], out, progress=False)
    before = weights(out)
    with pytest.raises(CheckpointError, match="already exists"):
        slerp_folders(model_folders["init"], [model_folders["b"]], out, progress=False)

    calls = []

    def fails_half_way(read, spans):  # a Merge whose fifth tensor hits a full disk
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return torch.ones(1, dtype=torch.float64)

    with pytest.raises(OSError, match="No space left"):
        merge_folders(fails_half_way, [model_folders["init"], model_folders["b"]], out, overwrite=True, progress=False)
    assert_same(weights(out), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "init", "merged"]  # no temporary left behind


def test_missing_and_non_hf_folders_are_named(model_folders, tmp_path):
    with pytest.raises(CheckpointError, match=f"model folder {tmp_path / 'nope'} does not exist"):
        slerp_folders(model_folders["init"], [tmp_path / "nope"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder: it has no config.json"):
        average_folders([tmp_path / "empty"], tmp_path / "out", progress=False)


def test_pickled_weights_are_refused_never_loaded(model_folders, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((model_folders["init"] / "config.json").read_text())
    torch.save(weights(model_folders["init"]), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: warp-ray never unpickles weights"):
        liti_folders(model_folders["init"], folder, tmp_path / "out", eta=0.5, progress=False)


@pytest.mark.parametrize("keep", [1000, -100], ids=["header cut", "data cut"])
def test_truncated_safetensors_is_reported_with_its_file(model_folders, tmp_path, keep):
    broken = model_folders["b"] / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=f"{broken} is not a readable safetensors file"):
        slerp_folders(model_folders["init"], [model_folders["a"], model_folders["b"]], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_different_architectures_raise_naming_the_tensor(model_folders, tmp_path):
    tiny_gpt2(n_embd=16).save_pretrained(tmp_path / "narrow")
    with pytest.raises(MergeError, match=r"tensor '.*': shape \[.*\] in .*narrow"):
        slerp_folders(model_folders["init"], [tmp_path / "narrow"], tmp_path / "out", progress=False)


def test_mismatched_dtypes_raise(model_folders, tmp_path):
    tiny_gpt2().to(torch.float16).save_pretrained(tmp_path / "half")
    with pytest.raises(MergeError, match="dtype torch.float16"):
        average_folders([model_folders["init"], tmp_path / "half"], tmp_path / "out", progress=False)


def test_non_float_tensors_are_copied_from_the_first_folder(tmp_path):
    for name, value in (("init", 0.0), ("a", 1.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        save_file(
            {"w": torch.full((4,), value), "ids": torch.arange(4) + int(value) * 100},
            tmp_path / name / "model.safetensors",
        )
    liti_folders(tmp_path / "init", tmp_path / "a", tmp_path / "out", eta=0.5, progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["ids"], torch.arange(4)) and torch.equal(merged["w"], torch.full((4,), 0.5))


def test_same_model_tells_checkpoints_that_differ_only_in_their_weights(model_folders, tmp_path):
    """What lets one engine sample both (warp-ray eval, compare): their weights alone differ."""
    assert same_model(model_folders["a"], model_folders["b"])
    shutil.copytree(model_folders["a"], tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    perturbed(tiny_gpt2(), 3).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # in shards
    assert same_model(model_folders["a"], tmp_path / "sharded")
    shutil.copytree(model_folders["init"], tmp_path / "bf16")
    tiny_gpt2().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # saved in another dtype: the same model
    assert same_model(model_folders["init"], tmp_path / "bf16")

    def changed(name: str, change) -> Path:
        folder = shutil.copytree(model_folders["a"], tmp_path / name)
        change(folder)
        return folder

    def edit_json(file: str, **values):
        return lambda folder: (folder / file).write_text(
            json.dumps({**json.loads((folder / file).read_text()), **values})
        )

    others = [
        changed("epsilon", edit_json("config.json", layer_norm_epsilon=1e-3)),  # the same tensors, computed otherwise
        changed("stops", edit_json("generation_config.json", eos_token_id=[0, 5])),  # vLLM stops at these too
        changed("template", edit_json("tokenizer_config.json", chat_template="{{ messages[0]['content'] }}")),
        changed(
            "fewer",
            lambda f: save_file(dict(list(load_file(f / "model.safetensors").items())[1:]), f / "model.safetensors"),
        ),
    ]
    tiny_gpt2(n_embd=64).save_pretrained(tmp_path / "wider")
    for other in others + [tmp_path / "wider"]:
        assert not same_model(model_folders["a"], other), other.name
