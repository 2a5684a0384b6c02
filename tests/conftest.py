from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.helpers import perturbed, tiny_gpt2

# Ray starts a worker per CPU when a cluster's first driver connects, before any work asks for one;
# on these 2 CPUs one of the two was left idle (a cluster and one actor), and a Ray worker that is
# never given work costs 2.4 CPU-seconds (bench/suite_profile.py). Every test cluster inherits this
# environment, those of the CLI's and `ray start`'s subprocesses too.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["the policy merges weights", "reward models average"] * 20,
        trainers.BpeTrainer(vocab_size=96, special_tokens=["<eos>", "<unk>"]),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def model_folders(tmp_path: Path, tokenizer) -> dict[str, Path]:
    """An init and two fine-tunes of it, saved as Hugging Face folders with a tokenizer."""
    init = tiny_gpt2()
    folders = {}
    for name, model in (("init", init), ("a", perturbed(init, 1)), ("b", perturbed(init, 2))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    return folders


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """The built-in task, built once per test session, smaller than the default to stay quick;
    its preference data cut at the 24 tokens the learners' tests generate."""
    from warp_ray.config import TaskParams
    from warp_ray.task.build import build_task

    params = TaskParams(corpus_size=2000, sft_steps=100, pairs=600, validation_pairs=300, ood_pairs=300)
    return build_task(params, tmp_path_factory.mktemp("task") / "task", max_new_tokens=24)


def remove_stale_current_cluster() -> None:
    current = Path("/tmp/ray/ray_current_cluster")
    if not current.is_file():
        return
    host, _, port = current.read_text().strip().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except (OSError, ValueError):  # nothing listens there: the cluster it names is gone
        current.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="module")
def no_stale_current_cluster():
    """Tests that start clusters of their own (`ray start`, ray.cluster_utils) and kill them leave
    /tmp/ray/ray_current_cluster naming a cluster that is gone, as a killed `ray start` does on a
    user's machine; Ray's state API in a later cluster's workers then waits 10 s on it, once per
    Ray Train run (its placement-group cleaner's stop). A file naming a live cluster stays."""
    remove_stale_current_cluster()
    yield
    remove_stale_current_cluster()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on loopback, 2 CPUs, shared by the tests that need Ray."""
    import ray

    from warp_ray.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
