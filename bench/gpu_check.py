"""What the CPU tests cannot see, checked on a GPU: a learner rank's step as the rank runs it
(warp_ray/learner/policy_update.py) and the merges (warp_ray/merge), with their speed, needing only
torch and transformers.

On a random Llama-style model of about 0.5B parameters, in bf16 with float32 master weights and
Adam state (the mix DeepSpeed keeps), from a batch that arrives on the CPU as Ray's object store
holds it:
- one REINFORCE step in micro-batches with activation checkpointing and chunked log-probs, then
  the EMA anchor's step; the step must move the policy and the anchor, with finite statistics;
- its peak GPU memory against warp_ray/memory.py's estimate for the same sizes (over it fails);
- the chunked log-probs against the whole computation: values, gradients, peak memory;
- greedy decoding from CPU prompt ids, and the weights copied out as float32 CPU tensors through
  a pinned staging buffer;
- the step's speed: its forward and backward, Adam's step and the EMA's, each timed alone (the
  median of 3), and tokens per second of the policy's forward alone and of the step's forward and
  backward;
- the float32 anchor scoring in bf16, as a rank training in bf16 runs it, against float32: its forward
  alone and the step's forward and backward, on this model and on one of Llama-2-7B's widths.

Then the merge kernels on one shard's worth of a 7B Llama's tensors (Llama-2-7B's shapes: its
embedding and 8 of its 32 layers, 1.75B parameters, 3.5 GB) in bf16 on the device: SLERP of M = 2
and M = 4 task vectors and LITI, each timed (the median of 3) against a device-to-device copy of the
same bytes in the same run, and checked against the same merge computed in float64.

`bench/gpu_check.sh` runs it; `--dry-run` runs the same code at tiny sizes on the CPU (a test runs
it there, with Ray, vLLM, DeepSpeed and pydantic made unimportable, as on the device machine).
Prints one JSON object, also written to $OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_ray.learner.policy_update import (  # noqa: E402
    Batch,
    anchor_scoring_dtype,
    device_of,
    frozen,
    greedy,
    host_copy,
    reinforce_step,
    scoring_precision,
)
from warp_ray.logprobs import token_logprobs  # noqa: E402
from warp_ray.memory import GB, OVERHEAD_BYTES, rank_bytes  # noqa: E402
from warp_ray.merge import average, ema_update_, liti, slerp  # noqa: E402

ANCHOR_DTYPE = anchor_scoring_dtype("bf16", zero_stage=0)
"""The dtype the check's float32 anchor scores in: a rank's, training in bf16 under ZeRO 0 (one GPU)."""

SIZES = {  # (hidden, layers, ffn, vocab, heads, rows, micro-batch rows, prompt tokens, completion tokens, chunk)
    "gpu": dict(
        hidden=1024, layers=24, ffn=4096, vocab=128_256, heads=16, rows=16, micro=4, prompt=128, new=384, chunk=128
    ),
    "dry-run": dict(hidden=64, layers=2, ffn=128, vocab=512, heads=4, rows=8, micro=4, prompt=6, new=10, chunk=4),
}

MERGE_SHARD = {  # the merged tensors' (hidden, ffn, vocab, decoder layers)
    "gpu": dict(hidden=4096, ffn=11008, vocab=32000, layers=8),
    "dry-run": dict(hidden=64, ffn=176, vocab=320, layers=2),
}
WIDE_ANCHOR = {  # a policy and anchor of Llama-2-7B's widths, few layers: where the anchor's dtype costs most
    "gpu": dict(hidden=4096, ffn=11008, vocab=32000, layers=4, heads=32),
    "dry-run": dict(hidden=64, ffn=176, vocab=320, layers=2, heads=4),
}
REPEATS = {"gpu": 3, "dry-run": 1}
"""Timed rounds of each speed measure, after an untimed first: their median is reported."""
MERGE_TOLERANCE = torch.finfo(torch.bfloat16).eps
"""The largest error of a bf16 merge against float64, relative to each tensor's largest magnitude:
rounding the result to bf16 alone costs up to half of it."""
MERGE_EQUAL = 0.99
"""The least share of a bf16 merge's elements equal to the float64 merge rounded to bf16."""


def random_batch(size: dict, generator: torch.Generator) -> Batch:
    rows, length = size["rows"], size["prompt"] + size["new"]
    attention = torch.ones(rows, length, dtype=torch.long)
    attention[1::2, -size["new"] // 2 :] = 0  # every other completion shorter: right padding
    completion = attention.clone()
    completion[:, : size["prompt"]] = 0
    return Batch(
        input_ids=torch.randint(1, size["vocab"], (rows, length), generator=generator) * attention,
        attention_mask=attention,
        completion_mask=completion,
        rewards=torch.randn(rows, generator=generator),
        sampled_logprobs=-torch.rand(rows, length, generator=generator) * completion,
    )


class MixedPrecisionAdam:
    """bf16 weights and gradients, float32 master weights, their gradients and Adam's moments: what
    DeepSpeed keeps in bf16, which the memory estimate counts."""

    def __init__(self, model: torch.nn.Module, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().requires_grad_(True) for p in self.params]
        self.adam = torch.optim.Adam(self.master, lr=lr)

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, 1.0)
        self.adam.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)
                m.grad = None


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Some tensor moved: a bf16 weight rounds most of a small step away (its float32 master keeps it)."""
    return any(not torch.equal(before[name], after[name]) for name in before)


def peak_bytes(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """The seconds of one call of fn, the device waited on at each end."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(
    parts: dict[str, Callable[[], object]], device: torch.device, repeats: int, alternate: bool = False
) -> dict[str, float]:
    """Each part's median seconds over `repeats` rounds after an untimed first, the parts called in
    their order within a round (a step's forward and backward, then its optimizer's step), or with
    `alternate` in the reverse order every other round (an A/B in which neither side always goes first)."""
    times = {name: [] for name in parts}
    for round_ in range(repeats + 1):
        for name, part in list(parts.items())[:: -1 if alternate and round_ % 2 else 1]:
            times[name].append(seconds_of(part, device))
    return {name: statistics.median(found[1:]) for name, found in times.items()}


def rl_step(
    policy, anchor, batch: Batch, size: dict, anchor_dtype: torch.dtype | None = ANCHOR_DTYPE
) -> dict[str, torch.Tensor]:
    """One REINFORCE step's forward and backward passes, in micro-batches, as a rank takes them."""
    parts = size["rows"] // size["micro"]
    return reinforce_step(
        policy,
        anchor,
        batch,
        device_of(policy),
        lambda loss: (loss / parts).backward(),
        beta=0.05,
        temperature=0.9,
        samples_per_prompt=2,
        baseline="rloo",
        micro_batch_size=size["micro"],
        logprob_chunk=size["chunk"],
        anchor_dtype=anchor_dtype,
    )


@torch.no_grad()
def scoring_forward(model, batch: Batch, size: dict, dtype: torch.dtype | None = None) -> None:
    """A forward without gradients over the batch, in the step's micro-batches, as the step scores
    (under autocast to `dtype`; None: in the model's own dtype)."""
    device = device_of(model)
    for start in range(0, size["rows"], size["micro"]):
        rows = batch.rows(start, start + size["micro"]).to(device)
        with scoring_precision(dtype, device):
            model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)


def step_speed(policy, anchor, optimizer: MixedPrecisionAdam, batch: Batch, size: dict, repeats: int) -> dict:
    """The step's parts timed alone, and tokens per second (the batch's, padding not counted) of the
    policy's forward without gradients, in the step's micro-batches, and of the step's forward and
    backward (the policy's, with activation checkpointing, and the anchor's forward)."""
    device = device_of(policy)
    tokens = int(batch.attention_mask.sum())
    seconds = median_seconds(
        {
            "forward": lambda: scoring_forward(policy, batch, size),
            "forward_backward": lambda: rl_step(policy, anchor, batch, size),
            "adam": optimizer.step,
            "ema": lambda: ema_update_(dict(anchor.named_parameters()), dict(policy.named_parameters()), 0.01),
        },
        device,
        repeats,
    )
    without_ema = seconds["forward_backward"] + seconds["adam"]
    return {
        "tokens": tokens,
        **{f"{name}_seconds": significant(value) for name, value in seconds.items()},
        "step_seconds_without_ema": significant(without_ema),
        "step_seconds_with_ema": significant(without_ema + seconds["ema"]),
        "forward_tokens_per_s": significant(tokens / seconds["forward"]),
        "forward_backward_tokens_per_s": significant(tokens / seconds["forward_backward"]),
    }


def anchor_speed(policy, anchor, batch: Batch, size: dict, repeats: int) -> dict:
    """The float32 anchor scoring in bf16 (under autocast, as a rank training in bf16 runs it) and in
    float32 (as it ran before 2026-12-04), the two ways alternating: its forward alone and the step's
    forward and backward, each way's seconds, and the float32 way's over the bf16 way's."""
    device = device_of(anchor)

    def step(anchor_dtype: torch.dtype | None) -> None:
        policy.zero_grad(set_to_none=True)  # as after an optimizer's step: no gradients to add to
        rl_step(policy, anchor, batch, size, anchor_dtype)

    seconds = median_seconds(
        {
            "anchor_forward_bf16": lambda: scoring_forward(anchor, batch, size, ANCHOR_DTYPE),
            "anchor_forward_float32": lambda: scoring_forward(anchor, batch, size),
            "forward_backward_bf16": lambda: step(ANCHOR_DTYPE),
            "forward_backward_float32": lambda: step(None),
        },
        device,
        repeats,
        alternate=True,
    )
    return {
        "parameters": sum(p.numel() for p in anchor.parameters()),
        **{f"{name}_seconds": significant(value) for name, value in seconds.items()},
        **{
            f"{part}_float32_over_bf16": significant(seconds[f"{part}_float32"] / seconds[f"{part}_bf16"])
            for part in ("anchor_forward", "forward_backward")
        },
    }


def shard_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    """A Llama's embedding and first decoder layers, named and shaped as its checkpoint holds them."""
    hidden, ffn = size["hidden"], size["ffn"]
    shapes = {"model.embed_tokens.weight": (size["vocab"], hidden)}
    for i in range(size["layers"]):
        layer = f"model.layers.{i}."
        shapes.update({f"{layer}self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"})
        shapes.update({f"{layer}mlp.{p}_proj.weight": (ffn, hidden) for p in ("gate", "up")})
        shapes[f"{layer}mlp.down_proj.weight"] = (hidden, ffn)
        shapes.update({f"{layer}{p}_layernorm.weight": (hidden,) for p in ("input", "post_attention")})
    return shapes


def against_float64(merged: dict[str, torch.Tensor], exact: Callable[[str], torch.Tensor]) -> dict:
    """The largest |merged - exact| over every tensor, against that tensor's largest exact magnitude,
    and the share of elements equal to the exact value rounded to the merged dtype: near 1 for a
    right merge computed in float32, far less for coefficients off by 1e-4 (each moves a quarter of
    the elements at least that near a rounding boundary of bf16's 2^-8)."""
    worst, equal, count = 0.0, 0, 0
    for name, tensor in merged.items():
        reference = exact(name)
        worst = max(worst, ((tensor.double() - reference).abs().max() / reference.abs().max()).item())
        equal += int((tensor == reference.to(tensor.dtype)).sum())
        count += tensor.numel()
    return {"relative_error": worst, "equal_when_rounded": equal / count}  # unrounded: the check compares them


def significant(value: float) -> float:
    """Three significant figures: a tiny dry run's rates and seconds are not rounded to 0."""
    return float(f"{value:.3g}")


def exact_slerp(init: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """SLERP of one tensor's task vectors in float64, written out apart from warp_ray.merge: the
    paper's pair formula, the m-th task vector slerped into the merge of the ones before at 1/m."""
    init = init.double()
    merged = models[0].double() - init
    for m, model in enumerate(models[1:], start=2):
        delta, lam = model.double() - init, 1.0 / m
        omega = torch.arccos((merged * delta).sum() / (merged.norm() * delta.norm()))
        merged = (torch.sin((1 - lam) * omega) * merged + torch.sin(lam * omega) * delta) / torch.sin(omega)
    return init + merged


def copy_speed(nbytes: int, device: torch.device, repeats: int) -> float:
    """GB/s of a copy of `nbytes` from one buffer to another on `device`, read and write counted."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / median_seconds({"copy": lambda: target.copy_(source)}, device, repeats)["copy"] / 1e9


def merge_speed(size: dict, device: torch.device, repeats: int) -> dict:
    """SLERP of M = 2 and M = 4 task vectors and LITI of bf16 tensors on `device`: seconds; GB/s of
    the least traffic each needs (its inputs read once, its result written once) and that against a
    copy of the same bytes; the error against the merge in float64, tensor by tensor; and whether
    every result stayed on the device in bf16."""
    generator = torch.Generator(device).manual_seed(1)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device).mul_(0.02)

    def ramp(t: torch.Tensor) -> torch.Tensor:
        return torch.linspace(0, 2, t.shape[0], device=device).view(-1, *[1] * (t.dim() - 1))

    # Task vectors as large as the weights, each its own draw plus a part all share, which grows from
    # nothing in a tensor's first row to twice the rest in its last: the angle between two of them
    # differs from chunk to chunk, so a Gram matrix missing a chunk gives other coefficients, and
    # SLERP differs from a linear merge by far more than the tolerance. Drawn in float32 a tensor at a
    # time: the inputs and a result are held in bf16 alone (about 21 GB of a 7B shard).
    init, models = {}, [{} for _ in range(4)]
    for name, shape in shard_shapes(size).items():
        base, shared = draw(shape), draw(shape)
        shared *= ramp(shared)
        for model in models:
            model[name] = (base + shared + draw(shape)).to(torch.bfloat16)
        init[name] = base.to(torch.bfloat16)
    shard_bytes = sum(t.numel() * t.element_size() for t in init.values())
    copy_gb_per_s = copy_speed(shard_bytes, device, repeats)

    def slerp64(count: int) -> Callable[[str], torch.Tensor]:
        return lambda name: exact_slerp(init[name], [m[name] for m in models[:count]])

    eta = 0.3
    merges = {  # name: (inputs, the merge, the same merge of one tensor in float64)
        "slerp_m2": (3, lambda: slerp(init, models[:2]), slerp64(2)),
        # the check's power: the linear merge of the same two must fail it
        "linear_m2_against_slerp": (2, lambda: average(models[:2]), slerp64(2)),
        "slerp_m4": (5, lambda: slerp(init, models), slerp64(4)),
        "liti": (
            2,
            lambda: liti(init, models[0], eta),
            lambda n: (1 - eta) * init[n].double() + eta * models[0][n].double(),
        ),
    }
    found = {"shard_gb": significant(shard_bytes / 1e9), "copy_gb_per_s": significant(copy_gb_per_s)}
    for name, (inputs, merge, exact) in merges.items():
        seconds = median_seconds({name: merge}, device, repeats)[name]
        merged = merge()
        gb_per_s = (inputs + 1) * shard_bytes / seconds / 1e9
        found[name] = {
            "seconds": significant(seconds),
            "gb_per_s": significant(gb_per_s),
            "of_copy": significant(gb_per_s / copy_gb_per_s),
            **against_float64(merged, exact),
            "on_the_device_in_bf16": all(t.device == device and t.dtype == torch.bfloat16 for t in merged.values()),
        }
        del merged
    return found


def llama_config(shape: dict, size: dict, **kw) -> LlamaConfig:
    """A Llama of `shape`'s widths and depth, for `size`'s sequences."""
    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=size["prompt"] + size["new"],
        **kw,
    )


def policy_and_anchor(model_config: LlamaConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random bf16 policy, in training mode with activation checkpointing, and its anchor: the same
    weights in float32, so that mu-sized EMA steps are not rounded away."""
    with device:
        policy = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
        anchor = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    anchor.load_state_dict(policy.state_dict())
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy.train(), frozen(anchor, device)


def check(dry_run: bool) -> dict:
    size = SIZES["dry-run" if dry_run else "gpu"]
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit(f"no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}): check the driver")
    # with its index: a tensor's device is "cuda:0", which torch.device("cuda") does not equal
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model_config = llama_config(size, size, tie_word_embeddings=True)
    policy, anchor = policy_and_anchor(model_config, device)
    sizes = [p.numel() for p in policy.parameters()]
    parameters = sum(sizes)
    optimizer = MixedPrecisionAdam(policy, lr=1e-5)
    batch = random_batch(size, torch.Generator().manual_seed(0))  # on the CPU, as from the object store
    policy_before, anchor_before = snapshot(policy), snapshot(anchor)

    reset_peak(device)
    start = time.perf_counter()
    stats = rl_step(policy, anchor, batch, size)
    optimizer.step()
    ema_update_(dict(anchor.named_parameters()), dict(policy.named_parameters()), 0.01)
    synchronize(device)
    step_seconds = time.perf_counter() - start
    step_peak = peak_bytes(device)
    estimate = rank_bytes(
        model_config,
        parameters,
        max(sizes),
        ranks=1,
        zero_stage=0,
        bf16=True,
        rows=size["micro"],
        sequence=size["prompt"] + size["new"],
        logprob_chunk=size["chunk"],
        activation_checkpointing=True,
    )
    stats = {k: v.item() for k, v in stats.items()}
    moved, anchor_moved = changed(policy_before, snapshot(policy)), changed(anchor_before, snapshot(anchor))

    logprobs = compare_chunked(policy, batch.rows(0, size["micro"]).to(device), size["chunk"])
    prompts = batch.input_ids[:2, : size["prompt"]].tolist()
    completions = greedy(policy, prompts, 8, synced_gpus=False)  # from training mode, as a rank calls it
    copies = host_copy(policy.named_parameters())
    copied_right = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in copies.values())
    copied_right &= torch.equal(copies["model.embed_tokens.weight"], policy.get_input_embeddings().weight.float().cpu())
    repeats = REPEATS["dry-run" if dry_run else "gpu"]
    speed = step_speed(policy, anchor, optimizer, batch, size, repeats)  # after the peak was read: it steps on
    anchors = {"check_model": anchor_speed(policy, anchor, batch, size, repeats)}
    del policy, anchor, optimizer, copies
    wide = WIDE_ANCHOR["dry-run" if dry_run else "gpu"]
    policy, anchor = policy_and_anchor(llama_config(wide, size), device)
    batch = random_batch({**size, "vocab": wide["vocab"]}, torch.Generator().manual_seed(1))
    anchors["llama_2_7b_layers"] = anchor_speed(policy, anchor, batch, size, repeats)
    del policy, anchor
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the merges' inputs and a result: about 21 GB
    merges = merge_speed(MERGE_SHARD["dry-run" if dry_run else "gpu"], device, repeats)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "parameters": parameters,
        "step_seconds": round(step_seconds, 3),
        "stats": stats,
        "policy_moved": moved,
        "anchor_moved": anchor_moved,
        "step_peak_gb": step_peak and round(step_peak / GB, 3),
        "estimate_gb": round(
            (estimate.total - OVERHEAD_BYTES) / GB, 3
        ),  # the allowance for CUDA's context is not allocated
        "estimate": str(estimate),
        **logprobs,
        "greedy_tokens": [len(c) for c in completions],
        "weights_copied_to_cpu_float32": copied_right,
        "speed": speed,
        "anchor_forward": anchors,
        "merges": merges,
    }
    merged = {name: merges[name] for name in ("slerp_m2", "slerp_m4", "liti")}
    linear = merges["linear_m2_against_slerp"]
    failures = [
        name
        for name, ok in [
            ("finite statistics", all(map(lambda v: v == v and abs(v) != float("inf"), stats.values()))),
            ("the step moved the policy", moved),
            ("the EMA step moved the anchor", anchor_moved),
            ("peak within the estimate", step_peak is None or step_peak <= estimate.total - OVERHEAD_BYTES),
            ("chunked log-probs equal the whole ones", logprobs["logprob_max_difference"] < 1e-2),
            ("chunked gradients equal the whole ones", logprobs["gradient_max_difference"] < 1e-2),
            ("greedy decoded 8 tokens a prompt", all(len(c) == 8 for c in completions)),
            ("weights copied out as float32 CPU tensors", copied_right),
            *(
                (
                    f"{name} within {MERGE_TOLERANCE:.4f} of float64, {MERGE_EQUAL:.0%} of it equal once rounded",
                    row["relative_error"] <= MERGE_TOLERANCE and row["equal_when_rounded"] >= MERGE_EQUAL,
                )
                for name, row in merged.items()
            ),
            (
                "a linear merge in SLERP's place fails the accuracy check",
                linear["relative_error"] > MERGE_TOLERANCE and linear["equal_when_rounded"] < MERGE_EQUAL,
            ),
            *((f"{name} on the device in bf16", row["on_the_device_in_bf16"]) for name, row in merged.items()),
        ]
        if not ok
    ]
    return {**result, "failures": failures}


def compare_chunked(policy: torch.nn.Module, batch: Batch, chunk: int) -> dict:
    """Log-probs and their gradient with respect to the logits, whole and in chunks, with each one's peak."""
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    tokens = batch.input_ids[:, 1:]
    found = {}
    for name, size in (("whole", 0), ("chunked", chunk)):
        leaf = logits.detach().requires_grad_(True)
        reset_peak(leaf.device)
        values = token_logprobs(leaf, tokens, 0.9, size)
        values.sum().backward()
        found[name] = (values.detach(), leaf.grad.float(), peak_bytes(leaf.device))
    (whole, whole_grad, whole_peak), (chunked, chunked_grad, chunked_peak) = found["whole"], found["chunked"]
    return {
        "logprob_max_difference": (whole - chunked).abs().max().item(),
        "gradient_max_difference": (whole_grad - chunked_grad).abs().max().item(),
        "logprob_peak_gb_whole": whole_peak and round(whole_peak / GB, 3),
        "logprob_peak_gb_chunked": chunked_peak and round(chunked_peak / GB, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code, no GPU")
    result = check(parser.parse_args().dry_run)
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
