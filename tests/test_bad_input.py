"""Bad input through the `warp-ray` command line: each case gets one message naming the problem
(the file, the line, the key, the tensor, the allowed range), exit status 2 and no traceback,
before anything starts. docs/reliability.md lists every case with the message printed here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.helpers import tiny_gpt2
from warp_ray.cli import main

DOC = Path(__file__).parent.parent / "docs" / "reliability.md"


@pytest.fixture
def inputs(tmp_path: Path, model_folders, tokenizer) -> Path:
    """A policy folder, prompts and preferences that a `warp` run accepts, and variants of each that it must refuse."""
    shutil.copytree(model_folders["init"], tmp_path / "sft")
    for name, model in (("wider", tiny_gpt2(n_embd=48)), ("deeper", _deeper())):
        model.save_pretrained(tmp_path / name)
    tiny_gpt2().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    ).save_pretrained(tmp_path / "llama")
    weights = (tmp_path / "sft" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("not_safetensors", b"\x80\x04PK pickled weights")):
        shutil.copytree(tmp_path / "sft", tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(data)
    shutil.copytree(tmp_path / "sft", tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "not_hf").mkdir()
    shutil.copytree(tmp_path / "sft", tmp_path / "remote_code")
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    (tmp_path / "remote_code" / "config.json").write_text(
        json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling.Model"}})
    )
    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(
        ["an entirely different corpus of words"] * 20,
        trainers.BpeTrainer(vocab_size=96, special_tokens=["<eos>", "<unk>"]),
    )
    shutil.copytree(tmp_path / "sft", tmp_path / "other_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "other_tokenizer"
    )

    good = "\n".join(json.dumps({"prompt": p}) for p in ("the policy", "reward models")) + "\n"
    prompts = {
        "prompts": good.encode(),
        "empty": b"",
        "latin1": good.encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
        "malformed": (good + '{"prompt": "unclosed\n').encode(),
        "long": (good + json.dumps({"prompt": "the policy merges weights " * 8}) + "\n").encode(),
        "chat": (good + json.dumps({"prompt": [{"role": "user", "content": "the policy"}]}) + "\n").encode(),
    }
    for name, train in prompts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_bytes(train)
        (tmp_path / name / "held_out.jsonl").write_text(good)
    (tmp_path / "preferences").mkdir()
    (tmp_path / "preferences" / "train.jsonl").write_text(
        json.dumps({"prompt": "the", "chosen": "policy", "rejected": "models"}) + "\n"
    )
    (tmp_path / "bad.yaml").write_text("warp: {beta: [0.1\n")
    return tmp_path


def _deeper():
    model = tiny_gpt2()
    model.config.n_layer = 3
    return type(model)(model.config)


def soup_run(*rewards: str) -> list[str]:
    """`warp-ray soup` with these rewards (YAML flow mappings, braces doubled for str.format)."""
    return ["soup", "--set", f"rewards=[{', '.join(rewards)}]", "--set", "paths.output_dir={tmp}/out"]


def warp_run(sft="sft", prompts="prompts", reward="sft", *extra):
    return [
        "warp",
        "--set",
        f"paths.sft_model={{tmp}}/{sft}",
        "--set",
        f"paths.prompts={{tmp}}/{prompts}",
        "--set",
        "paths.preferences={tmp}/preferences",
        "--set",
        f"paths.reward_model={{tmp}}/{reward}",
        "--set",
        "warp.max_new_tokens=8",
        "--set",
        "paths.output_dir={tmp}/out",
        *extra,
    ]


CASES = {
    "unknown config key": ["config", "--set", "warp.betta=0.1"],
    "config value out of range": ["config", "--set", "warp.eta=1.5"],
    "config of the wrong type": ["config", "--set", "warp.M=two"],
    "config file not YAML": ["config", "--config", "{tmp}/bad.yaml"],
    "config file missing": ["config", "--config", "{tmp}/missing.yaml"],
    "model path that does not exist": ["config", "--set", "paths.sft_model={tmp}/missing"],
    "model path that is not a Hugging Face folder": ["config", "--set", "paths.sft_model={tmp}/not_hf"],
    "model that ships its own code": ["config", "--set", "paths.sft_model={tmp}/remote_code"],
    "merge: different tokenizers": [
        "merge",
        "average",
        "--models",
        "{tmp}/sft",
        "{tmp}/other_tokenizer",
        "--out",
        "{tmp}/o",
    ],
    "chat prompts for a tokenizer without a chat template": warp_run(prompts="chat"),
    "WARM batch not split over its workers": ["config", "--set", "warm.workers_per_rm=3"],
    "WARM worker over its GPU share": [
        "train-rm",
        "--set",
        "paths.sft_model={tmp}/sft",
        "--set",
        "paths.preferences={tmp}/preferences",
        "--set",
        "warm.gpus_per_trial=1",
        "--set",
        "resources.gpu_memory_gb=2",
        "--set",
        "paths.output_dir={tmp}/out",
    ],
    "merge: different architectures": ["merge", "average", "--models", "{tmp}/sft", "{tmp}/llama", "--out", "{tmp}/o"],
    "merge: different keys": ["merge", "average", "--models", "{tmp}/sft", "{tmp}/deeper", "--out", "{tmp}/o"],
    "merge: different shapes": [
        "merge",
        "slerp",
        "--init",
        "{tmp}/sft",
        "--models",
        "{tmp}/a",
        "{tmp}/wider",
        "--out",
        "{tmp}/o",
    ],
    "merge: different dtypes": [
        "merge",
        "liti",
        "--init",
        "{tmp}/sft",
        "--merged",
        "{tmp}/bf16",
        "--eta",
        "0.3",
        "--out",
        "{tmp}/o",
    ],
    "soup: a lambda per policy": [
        *["merge", "soup", "--models", "{tmp}/sft", "{tmp}/sft", "--lambdas", "1", "--out", "{tmp}/o"],
    ],
    "soup: a negative lambda": [
        *["merge", "soup", "--models", "{tmp}/sft", "{tmp}/sft", "--lambdas", "1.5", "-0.5", "--out", "{tmp}/o"],
    ],
    "soup: lambdas off the simplex": [
        *["merge", "soup", "--models", "{tmp}/sft", "{tmp}/sft", "--lambdas", "0.5", "0.6", "--out", "{tmp}/o"],
    ],
    "rewarded soup: one reward": soup_run("{{name: a, kind: builtin, path: positivity}}"),
    "rewarded soup: two rewards of one name": soup_run(
        "{{name: a, kind: builtin, path: positivity}}", "{{name: a, kind: builtin, path: concision}}"
    ),
    "rewarded soup: no such built-in reward": soup_run(
        "{{name: a, kind: builtin, path: positivity}}", "{{name: b, kind: builtin, path: kindness}}"
    ),
    "rewarded soup: reward model missing": soup_run(
        "{{name: a, kind: builtin, path: positivity}}", "{{name: b, kind: model, path: {tmp}/missing}}"
    ),
    "rewarded soup: reward model not safetensors": soup_run(
        "{{name: a, kind: model, path: {tmp}/sft}}", "{{name: b, kind: warm, path: [{tmp}/sft, {tmp}/pickled]}}"
    ),
    "rewarded soup: a WARM of one folder": soup_run(
        "{{name: a, kind: builtin, path: positivity}}", "{{name: b, kind: warm, path: [{tmp}/sft]}}"
    ),
    "rewarded soup: a reward named as a measure": soup_run(
        "{{name: a, kind: builtin, path: positivity}}", "{{name: kl_to_sft, kind: builtin, path: concision}}"
    ),
    "rewarded soup: a seed twice": [
        *soup_run("{{name: a, kind: builtin, path: positivity}}", "{{name: b, kind: builtin, path: concision}}"),
        *["--set", "soup.seeds=[0, 0]"],
    ],
    "rewarded soup: chat prompts and a built-in reward": [
        *soup_run("{{name: a, kind: builtin, path: positivity}}", "{{name: b, kind: builtin, path: concision}}"),
        *["--set", "paths.sft_model={tmp}/sft", "--set", "paths.prompts={tmp}/chat"],
    ],
    "merge: weights that do not fit": [
        "merge",
        "average",
        "--models",
        "{tmp}/sft",
        "{tmp}/a",
        "--weights",
        "1",
        "--out",
        "{tmp}/o",
    ],
    "merge: output exists": ["merge", "average", "--models", "{tmp}/sft", "{tmp}/a", "--out", "{tmp}/a"],
    "empty JSONL": warp_run(prompts="empty"),
    "JSONL that is not UTF-8": warp_run(prompts="latin1"),
    "malformed JSONL": warp_run(prompts="malformed"),
    "prompt longer than the context": warp_run(prompts="long"),
    "truncated safetensors checkpoint": warp_run(sft="truncated"),
    "checkpoint that is not safetensors": [
        "merge",
        "average",
        "--models",
        "{tmp}/sft",
        "{tmp}/not_safetensors",
        "--out",
        "{tmp}/o",
    ],
    "pickled checkpoint only": ["merge", "average", "--models", "{tmp}/sft", "{tmp}/pickled", "--out", "{tmp}/o"],
}


def shown(message: str, tmp: Path) -> str:
    """The message as docs/reliability.md shows it: one line, the test's folder as <tmp>."""
    return " ".join(message.replace(str(tmp), "<tmp>").split())


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_clear_message_and_exit_status_2(case, inputs, capsys):
    argv = [arg.format(tmp=inputs) for arg in CASES[case]]
    assert main(argv) == 2
    # Lines that Ray forwards from other tests' workers ("(RolloutWorker pid=...) ...") may come in between.
    err = "".join(
        line for line in capsys.readouterr().err.splitlines(keepends=True) if not line.startswith("\x1b[36m(")
    )
    assert err.startswith("warp-ray: error: ") and "Traceback" not in err
    message = shown(err.removeprefix("warp-ray: error: "), inputs)
    documented = re.search(rf"^\| {re.escape(case)} \| `(.*)` \|$", DOC.read_text(), re.MULTILINE)
    assert documented, f"docs/reliability.md has no row for {case!r}; its message: {message}"
    assert documented.group(1) == message
    # nothing written, nothing started
    assert not (inputs / "o").exists() and not (inputs / "out" / "iteration_0").exists()
    assert CASES[case][0] != "soup" or not (inputs / "out").exists()


@pytest.mark.parametrize(
    "command",
    [["config"], ["train-rm"], ["warp"], ["soup"], ["reproduce"], ["reproduce", "--regime-only"]],
    ids=" ".join,
)
def test_every_entry_point_checks_the_folders_the_config_names_first(command, tmp_path, capsys):
    argv = [*command, "--set", f"paths.sft_model={tmp_path}/missing", "--set", f"paths.prompts={tmp_path}"]
    assert main([*argv, "--set", f"paths.output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert f"paths.sft_model = '{tmp_path}/missing': model folder {tmp_path}/missing does not exist" in err
    assert f"paths.prompts = '{tmp_path}': {tmp_path} has no train.jsonl" in err  # every problem, in one message
    assert not (tmp_path / "out").exists()  # before anything starts


def test_the_command_line_exits_2_without_a_traceback(inputs):
    """The same through a real process: what a user's shell and a Ray job see."""
    argv = [arg.format(tmp=inputs) for arg in CASES["malformed JSONL"]]
    done = subprocess.run([sys.executable, "-m", "warp_ray.cli", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"{inputs}/malformed/train.jsonl:3: not valid JSON" in done.stderr


def test_a_users_own_inputs_are_checked_without_building_anything_of_the_built_in_task(inputs, capsys):
    """A policy, prompts and a reward model given, no preferences: none are needed, none are built,
    and the bad line is reported before anything else happens."""
    argv = [arg.format(tmp=inputs) for arg in warp_run(prompts="malformed")]
    given = argv.index(f"paths.preferences={inputs}/preferences")
    assert main(argv[: given - 1] + argv[given + 1 :]) == 2
    assert f"{inputs}/malformed/train.jsonl:3: not valid JSON" in capsys.readouterr().err
    assert not (inputs / "out" / "task").exists()


def test_a_users_own_sft_gets_none_of_the_built_in_tasks_data(inputs, capsys):
    """The built-in task's prompts and pairs belong to its own SFT: with yours, the data a run needs
    must be yours too, and is asked for at once, with nothing built."""
    own_sft = ["--set", f"paths.sft_model={inputs}/sft", "--set", f"paths.output_dir={inputs}/out"]
    assert main(["warp", *own_sft, "--set", f"paths.prompts={inputs}/prompts"]) == 2
    assert "set paths.preferences (reward models are trained on them)" in capsys.readouterr().err
    assert main(["train-rm", *own_sft]) == 2
    assert "set paths.preferences" in capsys.readouterr().err
    assert main(["warp", *own_sft, "--set", f"paths.reward_model={inputs}/sft"]) == 2
    assert "set paths.prompts (RL samples them)" in capsys.readouterr().err
    assert not (inputs / "out" / "task").exists()
