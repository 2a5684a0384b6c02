"""The merge demo: M fine-tunes of one tiny GPT-2, merged the WARP way, with real numbers.

A tiny GPT-2 is pre-trained on sequences that follow additive rules (x_{t+1} = x_t + k mod V),
then M copies of it are fine-tuned on a new rule (x_{t+1} = 2 x_t + 1 mod V), each with its
own data order and its own EMA. The fine-tunes are saved as Hugging Face folders and merged
by the streaming folder merges: SLERP of their task vectors, LERP (the plain average), and
LITI towards the init. Every model is scored on held-out sequences of the new rule: the
next-token loss (lower is better, our "reward") and the KL to the init (lower is closer).
Everything is built on the fly; it takes about half a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from warp_ray.config import WarpConfig
from warp_ray.merge import ema_update_, liti
from warp_ray.merge.folders import average_folders, liti_folders, slerp_folders
from warp_ray.merge.state_dict import StateDict

VOCAB, LENGTH, BATCH = 64, 24, 64
PRETRAIN_STEPS, FINETUNE_STEPS, PRETRAIN_LR, FINETUNE_LR = 300, 40, 3e-3, 1e-3
FRONT_ETAS = (0.0, 0.1, 0.3, 0.5, 0.8, 1.0)


def sequences(rule: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` sequences following `rule`: 'add' (a random step k in 1..4 each) or 'affine' (2x +
    1, +1 half the time)."""
    x = torch.randint(VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 5, (count, 1), generator=generator)
    columns = [x]
    for _ in range(LENGTH - 1):
        x = (
            (x + step) % VOCAB
            if rule == "add"
            else (2 * x + 1 + torch.randint(2, x.shape, generator=generator)) % VOCAB
        )
        columns.append(x)
    return torch.cat(columns, dim=1)


def train(
    model: GPT2LMHeadModel, rule: str, steps: int, lr: float, seed: int, mu: float | None = None
) -> StateDict | None:
    """Next-token training on `rule`; returns the float32 EMA of the weights when mu is given."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if mu is not None else None
    model.train()
    for _ in range(steps):
        batch = sequences(rule, BATCH, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema_update_(ema, model.state_dict(), mu)
    return ema


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, init: GPT2LMHeadModel, held_out: torch.Tensor) -> dict[str, float]:
    """Next-token loss on the new rule, and the mean per-token KL(model || init)."""
    model.eval()
    logits, init_logits = model(held_out).logits[:, :-1], init(held_out).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), held_out[:, 1:].reshape(-1)).item()
    logp, init_logp = logits.log_softmax(-1), init_logits.log_softmax(-1)
    kl = (logp.exp() * (logp - init_logp)).sum(-1).mean().item()
    return {"loss": loss, "kl_to_init": kl}


def task_vector_angles(init: StateDict, a: StateDict, b: StateDict) -> dict[str, float]:
    """Per-tensor angles (degrees) between the task vectors a - init and b - init, and between a and b."""

    def angle(u: torch.Tensor, v: torch.Tensor) -> float:
        cos = torch.dot(u.flatten(), v.flatten()) / (u.norm() * v.norm())
        return math.degrees(math.acos(max(-1.0, min(1.0, cos.item()))))

    keys = [
        k for k in init if init[k].is_floating_point() and (a[k] - init[k]).norm() > 0 and (b[k] - init[k]).norm() > 0
    ]
    deltas = [angle(a[k] - init[k], b[k] - init[k]) for k in keys]
    weights = [angle(a[k], b[k]) for k in keys]
    return {
        "task_vectors_mean": sum(deltas) / len(deltas),
        "task_vectors_min": min(deltas),
        "task_vectors_max": max(deltas),
        "full_weights_max": max(weights),
    }


def load(folder: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(folder).eval()


def run_demo(config: WarpConfig, out_dir: Path) -> dict:
    torch.manual_seed(config.warp.seed)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    M, seed = config.warp.M, config.warp.seed
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    )
    print(f"pre-training a {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M-parameter GPT-2 on the 'add' rules")
    train(base, "add", PRETRAIN_STEPS, PRETRAIN_LR, seed)
    base.save_pretrained(out_dir / "init")
    init = load(out_dir / "init")

    policies = []
    for m in range(M):
        print(f"fine-tuning policy {m + 1}/{M} on the 'affine' rule (data order {m}, EMA mu = {config.warp.mu})")
        model = load(out_dir / "init")
        ema = train(model, "affine", FINETUNE_STEPS, FINETUNE_LR, seed + 1 + m, mu=config.warp.mu)
        model.save_pretrained(out_dir / f"policy_{m + 1}")
        model.load_state_dict(ema)
        model.save_pretrained(out_dir / f"ema_{m + 1}")
        policies.append(out_dir / f"policy_{m + 1}")

    print("merging the policies' folders: SLERP of task vectors, LERP, and LITI towards the init")
    slerp_folders(
        out_dir / "init",
        policies,
        out_dir / "slerp",
        weights=config.warp.slerp_weights(),
        overwrite=True,
        progress=False,
    )
    average_folders(policies, out_dir / "lerp", overwrite=True, progress=False)
    liti_folders(
        out_dir / "init", out_dir / "slerp", out_dir / "next_init", eta=config.warp.eta, overwrite=True, progress=False
    )

    held_out = sequences("affine", 256, torch.Generator().manual_seed(10_000 + seed))
    rows = {"init": evaluate(init, init, held_out)}
    for m in range(M):
        rows[f"policy {m + 1}"] = evaluate(load(policies[m]), init, held_out)
        rows[f"EMA {m + 1}"] = evaluate(load(out_dir / f"ema_{m + 1}"), init, held_out)
    rows["LERP (average)"] = evaluate(load(out_dir / "lerp"), init, held_out)
    slerped = load(out_dir / "slerp")
    rows["SLERP"] = evaluate(slerped, init, held_out)
    front_model = load(out_dir / "init")
    for eta in FRONT_ETAS:
        front_model.load_state_dict(liti(init.state_dict(), slerped.state_dict(), eta))
        rows[f"LITI eta={eta}"] = evaluate(front_model, init, held_out)
    rows[f"next init (eta={config.warp.eta})"] = evaluate(load(out_dir / "next_init"), init, held_out)

    summary = {"models": rows}
    if M >= 2:
        summary["angles_degrees"] = task_vector_angles(
            init.state_dict(), load(policies[0]).state_dict(), load(policies[1]).state_dict()
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{'model':<24}{'loss (new rule)':>16}{'KL to init':>12}")
    for name, row in rows.items():
        print(f"{name:<24}{row['loss']:>16.4f}{row['kl_to_init']:>12.4f}")
    if "angles_degrees" in summary:
        a = summary["angles_degrees"]
        print(
            f"\ntask vectors of policies 1 and 2, per tensor: mean {a['task_vectors_mean']:.1f} deg "
            f"(min {a['task_vectors_min']:.1f}, max {a['task_vectors_max']:.1f}); "
            f"full weights: at most {a['full_weights_max']:.1f} deg apart"
        )
    print(f"\nfolders and summary.json in {out_dir}")
    return summary
