"""The configuration: paper defaults, YAML and command-line overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from warp_ray.config import RewardSpec, WarpConfig
from warp_ray.config_io import check_paths, load_config
from warp_ray.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers():
    warp = WarpConfig().warp
    assert (warp.beta, warp.mu, warp.eta, warp.lr, warp.warmup_steps, warp.batch_size, warp.temperature) == (
        0.1,
        0.01,
        0.3,
        1e-6,
        100,
        128,
        0.9,
    )
    assert (warp.anchor, warp.lam, warp.slerp_weights()) == ("ema", None, None)
    warm = WarpConfig().warm
    assert (warm.learning_rates, warm.dropouts) == ([1e-5, 4e-5, 1e-4], [0.05, 0.1])


def test_every_field_is_documented():
    sections = [f.annotation for f in WarpConfig.model_fields.values() if hasattr(f.annotation, "model_fields")]
    undocumented = [
        f"{s.__name__}.{name}"
        for s in [*sections, RewardSpec]
        for name, f in s.model_fields.items()
        if not f.description
    ]
    assert len(sections) >= 12 and undocumented == []
    assert WarpConfig.model_fields["rewards"].description  # the one list of sections


def test_tiny_config_loads_and_overrides_apply():
    config = load_config(CONFIGS / "tiny.yaml", ["warp.beta=0.05", "warm.dropouts=[0.0, 0.2]", "warp.lam=0.4"])
    assert config.warp.beta == 0.05 and config.warm.dropouts == [0.0, 0.2]
    assert config.warp.slerp_weights() == pytest.approx((0.6, 0.4))
    assert config.warp.M == 2 and config.resources.precision == "fp32"


def test_yaml_round_trip():
    config = load_config(CONFIGS / "tiny.yaml")
    assert WarpConfig.from_dict(__import__("yaml").safe_load(config.to_yaml())) == config


def test_the_7b_example_needs_its_model_paths(tmp_path, model_folders):
    with pytest.raises(
        ConfigError, match="paths.sft_model = '/mnt/models/gemma-7b-sft': model folder .* does not exist"
    ):
        check_paths(load_config(CONFIGS / "gemma-7b-gpu.yaml").paths)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for split in ("train", "held_out"):
        (prompts / f"{split}.jsonl").write_text('{"prompt": "hello"}\n')
    config = load_config(
        CONFIGS / "gemma-7b-gpu.yaml",
        [
            f"paths.sft_model={model_folders['init']}",
            f"paths.reward_model={model_folders['a']}",
            f"paths.prompts={prompts}",
        ],
    )
    check_paths(config.paths)  # folders that exist and hold what they should pass
    assert config.resources.zero_stage == 3 and config.warp.T == 9000


def test_the_config_holds_values_and_reads_no_file():
    """A folder that does not exist is a valid value: checking it is the entry points' `check_paths`."""
    config = WarpConfig.from_yaml("paths: {sft_model: /no/such/model}")
    assert str(config.paths.sft_model) == "/no/such/model"


@pytest.mark.parametrize(
    "override, message",
    [
        ("warp.eta=1.5", r"warp.eta = 1.5: .* \(allowed range: \[0, 1\]\)"),
        ("warp.eta=-0.1", r"warp.eta = -0.1: .* \(allowed range: \[0, 1\]\)"),
        ("warp.M=0", r"warp.M = 0: .* \(allowed range: >= 1\)"),
        ("warp.beta=-1", r"warp.beta = -1: .* \(allowed range: >= 0\)"),
        ("warp.lr=0", r"warp.lr = 0: .* \(allowed range: > 0\)"),
        ("warm.dropouts=[0.1, 1.0]", r"warm.dropouts.1 = 1.0: Input should be less than 1"),
        ("warp.betta=0.1", r"unknown key 'warp.betta'; did you mean 'beta'\?"),
        (
            "rl.beta=0.1",
            r"unknown key 'rl'; known keys here: warp, warm, task, reward_server, resources, learners, evaluation, "
            r"reproduce, paths",
        ),
        ("resources.zero_stage=4", r"resources.zero_stage = 4: Input should be 0, 1, 2 or 3"),
        ("reproduce.seeds=[0, 1, 0]", r"reproduce.seeds = \[0, 1, 0\]: .*the seeds repeat one"),
        ("reproduce.seeds=[]", r"reproduce.seeds = \[\]: .*at least 1 item"),
        ("warp.anchor=init", r"warp.anchor = 'init': Input should be 'ema' or 'sft'"),
        (
            "resources.ranks_per_learner=3",
            r"warp.batch_size = 128 must be a multiple of resources.ranks_per_learner = 3",
        ),
        ("warp.lam=0.3", None),
    ],
)
def test_invalid_values_name_the_key_value_and_range(override, message):
    if message is None:  # lam is valid with M = 2 but not with M = 3
        load_config(None, [override])
        with pytest.raises(ConfigError, match=r"lam = 0.3 applies to M = 2 only \(M = 3\)"):
            load_config(None, [override, "warp.M=3"])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_folder_without_config_json_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="is not a Hugging Face model folder: it has no config.json"):
        check_paths(load_config(None, [f"paths.sft_model={tmp_path}"]).paths)


def test_data_folders_need_a_train_split(tmp_path):
    with pytest.raises(ConfigError, match=f"paths.preferences = '{tmp_path}': {tmp_path} has no train.jsonl"):
        check_paths(load_config(None, [f"paths.preferences={tmp_path}"]).paths)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("warp: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections, got list"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["warp.beta"])


@pytest.mark.parametrize(
    "resources, threads",
    [
        ({"cpus_per_rank": 0.5, "cpus_per_rollout_worker": 0.5}, 1),  # configs/tiny.yaml: 2 learners on 2 cores
        ({"cpus_per_rank": 1, "cpus_per_rollout_worker": 1}, 2),  # the engine's CPU too, while it waits
        ({"ranks_per_learner": 2, "cpus_per_rank": 1, "cpus_per_rollout_worker": 1}, 1),  # 3 CPUs over 2 ranks
        ({"ranks_per_learner": 2, "cpus_per_rank": 2, "rollout_workers_per_learner": 2}, 3),
        ({"cpus_per_rank": 0.2, "cpus_per_rollout_worker": 0.6, "rollout_workers_per_learner": 3}, 2),  # not 1.999...
    ],
)
def test_a_rank_takes_its_learners_cpus_over_its_ranks_in_threads(resources, threads):
    assert WarpConfig.from_dict({"resources": resources}).resources.threads_per_rank == threads
