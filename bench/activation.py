"""What the built-in task's activation costs. Its GPT-2 uses GPT-2's own `gelu_new`, which transformers
computes in eight elementwise operations; torch's fused tanh GELU (`gelu_pytorch_tanh`) computes the
same formula in one. Both, in the same weights (bench/scaling.py's small built-in task, the demo's
shapes), one thread: a reward model's scoring (`warp_ray.reward.model.score`, forward passes), WARM's
fine-tune steps (the Bradley-Terry loss, forward and backward, dropout on; no optimizer step), and the
SFT policy's sampling with `generate` (no top-k, as the task's preference data is sampled, each
completion forced to the length limit). Each measure's median over rounds that alternate which
activation goes first, and the largest difference between the two models' scores. Switching would
change every sample drawn from the task's models after the first rounding difference
(docs/benchmarks.md, "The demo's CPU work").

Run: .venv/bin/python bench/activation.py   (builds bench/scaling.py's small task under bench/out/ once)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from scaling import TINY, task_folder
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from warp_ray.config_io import load_config
from warp_ray.data import DEFAULT_COLUMNS, read_preferences
from warp_ray.reward.model import bradley_terry_loss, score

ACTIVATIONS = {"gelu_new": "NewGELUActivation", "gelu_pytorch_tanh": "GELUTanh"}
"""transformers' name of each activation, and the class it builds."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each measure, each activation once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()  # the new score head's notice
    config = load_config(TINY)
    task = task_folder(config)
    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    pairs = read_preferences(task / "preferences" / "validation.jsonl", DEFAULT_COLUMNS)
    prompts = [p["prompt"] for p in pairs]
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    models = {}
    for activation in ACTIVATIONS:
        torch.manual_seed(0)  # the same new score head in both reward models
        reward = AutoModelForSequenceClassification.from_pretrained(
            task / "sft", num_labels=1, pad_token_id=tokenizer.pad_token_id, activation_function=activation
        )
        policy = AutoModelForCausalLM.from_pretrained(task / "sft", activation_function=activation)
        for model in (reward, policy):
            assert type(model.transformer.h[0].mlp.act).__name__ == ACTIVATIONS[activation], activation
        models[activation] = (reward.eval(), policy.eval())
    batch = tokenizer(prompts[:64], return_tensors="pt", padding=True, padding_side="left")
    tokens, pairs_a_step = config.warp.max_new_tokens, config.warm.batch_size

    def scoring(reward, _) -> torch.Tensor:
        return score(reward, tokenizer, prompts + prompts, completions)

    def fine_tune_steps(reward, _) -> None:
        reward.train()
        for start in range(0, 10 * pairs_a_step, pairs_a_step):
            bradley_terry_loss(reward, tokenizer, pairs[start : start + pairs_a_step]).backward()
        reward.zero_grad()
        reward.eval()

    def sampling(_, policy) -> None:
        policy.generate(
            **batch,
            do_sample=True,
            top_k=0,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=tokenizer.pad_token_id,
        )

    scores = [scoring(*models_of) for models_of in models.values()]
    print(f"largest difference between the two models' scores: {(scores[0] - scores[1]).abs().max().item():.2g}\n")
    print(f"| one thread, median of {args.rounds} rounds | {' s | '.join(ACTIVATIONS)} s | ratio |\n|---|---|---|---|")
    measures = {
        f"scoring {len(completions)} texts": scoring,
        f"10 fine-tune steps of {pairs_a_step} pairs": fine_tune_steps,
        f"sampling {len(batch['input_ids'])} completions of {tokens} tokens": sampling,
    }
    for name, measure in measures.items():
        seconds = {activation: [] for activation in ACTIVATIONS}
        for models_of in models.values():  # untimed: the allocator's and oneDNN's first calls
            measure(*models_of)
        for round_ in range(args.rounds):
            for activation in ACTIVATIONS if round_ % 2 == 0 else reversed(ACTIVATIONS):
                start = time.perf_counter()
                measure(*models[activation])
                seconds[activation].append(time.perf_counter() - start)
        new, fused = (statistics.median(seconds[a]) for a in ACTIVATIONS)
        print(f"| {name} | {new:.3f} | {fused:.3f} | {fused / new:.2f} |")


if __name__ == "__main__":
    main()
