"""One WARM fine-tune: the Ray Tune trial (`fine_tune`) that runs it as a Ray Train run, and the
function each worker of its `TorchTrainer` runs (`fine_tune_worker`).

Ray Train starts `warm.workers_per_rm` workers with a process group between them (gloo on the
CPU, NCCL on GPUs) and a GPU each when the config gives them. Each worker is a DeepSpeed rank
(ZeRO stage and precision from `warm`) and takes an equal share of every step's pairs: the
gradient is that of the whole batch, as in a single process (each rank draws its own dropout
masks). Every `warm.checkpoint_every` steps each worker writes its part of a DeepSpeed
checkpoint (weights, Adam's state, the step) into one Ray Train checkpoint; when a worker dies,
Ray Train restarts the run and the workers resume from that checkpoint (`warm.max_failures`
times), taking the pairs the run would have taken (dropout masks are drawn afresh). At the end,
rank 0 writes the reward model as an HF folder, its weights gathered from every rank under
ZeRO-3. ZeRO-3 shards the training state; each worker still loads the whole model before
DeepSpeed shards it, and holds it whole for the final save.

The trial's process imports this module to run `fine_tune`, so transformers and DeepSpeed are
imported by the workers alone (about 3 s of each trial's start on a CPU).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from warp_ray.config import WarmParams
from warp_ray.data import read_preferences
from warp_ray.runtime import environment_ninja_first

STATE_TAG = "state"
"""The DeepSpeed tag of a mid-run checkpoint."""


def _is_mid_run(checkpoint: ray.train.Checkpoint) -> bool:
    with checkpoint.as_directory() as folder:
        return (Path(folder) / STATE_TAG).is_dir()


def deepspeed_config(params: WarmParams, lr: float) -> dict:
    # Weight decay named explicitly: torch's AdamW, which DeepSpeed builds for "Adam", decays by 0.01 otherwise.
    adam = {"lr": lr, "weight_decay": 0.0, "torch_adam": True, "adam_w_mode": True}
    return {
        "train_micro_batch_size_per_gpu": params.batch_size // params.workers_per_rm,
        "train_batch_size": params.batch_size,
        "optimizer": {"type": "Adam", "params": adam},
        "zero_optimization": {"stage": params.zero_stage},
        "bf16": {"enabled": params.precision == "bf16"},
    }


def worker_threads(params: WarmParams) -> int:
    """Torch threads of a worker: its share of a fine-tune's CPUs, at least one (Ray's OMP_NUM_THREADS
    does not reach torch's thread pool)."""
    return max(1, round(params.cpus_per_worker))


def rank_spread(module: torch.nn.Module, device: torch.device) -> float:
    """The largest difference between two ranks' sums of a weight tensor: 0 when every rank holds the
    same model (below ZeRO-3, where each holds it whole)."""
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in module.parameters()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of every rank's `value`: each rank's loss is that of its share of the pairs."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def fine_tune_worker(config: dict) -> None:
    """Bradley-Terry fine-tuning of `config["start"]` with trial m's lr, dropout and data order."""
    params: WarmParams = config["params"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(worker_threads(params))
    else:
        os.environ["LOCAL_RANK"] = str(device.index)  # DeepSpeed's device: the GPU Ray Train gave this worker
    import deepspeed

    from warp_ray.reward.model import bradley_terry_loss, load_reward_model

    environment_ninja_first()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins Ray Train's process group
    trial = {k: config[k] for k in ("index", "lr", "dropout", "seed", "start")}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and not _is_mid_run(checkpoint):
        # Restarted after its last report: that checkpoint is the reward model, and the run is done.
        done = {**trial, "step": params.steps, "resumed_from": params.steps, "worker_pid": os.getpid()}
        ray.train.report(done, checkpoint=checkpoint if rank == 0 else None)
        return
    torch.manual_seed(trial["seed"] * world + rank)  # dropout masks differ between ranks, as between pairs
    dtype = torch.bfloat16 if params.precision == "bf16" else torch.float32  # as DeepSpeed will cast it anyway
    model, tokenizer = load_reward_model(trial["start"], trial["dropout"], config["trust_remote_code"], dtype)
    pairs = read_preferences(config["train"], config["columns"])
    # The whole run's data order, drawn at once: a resumed run takes the same pairs it would have.
    order = torch.randint(
        len(pairs), (params.steps, params.batch_size), generator=torch.Generator().manual_seed(trial["seed"])
    )
    share = params.batch_size // world
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(params, trial["lr"])
    )
    resumed_from = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, state = engine.load_checkpoint(folder, tag=STATE_TAG)
        resumed_from = state["step"]
    engine.train()
    losses = []
    for step in range(resumed_from, params.steps):
        loss = bradley_terry_loss(engine, tokenizer, [pairs[i] for i in order[step, rank * share : (rank + 1) * share]])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        metrics = {
            **trial,
            "step": step + 1,
            "loss": sum(losses[-20:]) / len(losses[-20:]),
            "resumed_from": resumed_from,
            "worker_pid": os.getpid(),  # not "pid": Tune's result rows name the trial's own process by it
        }
        if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
            metrics["loss"] = mean_over_ranks(metrics["loss"], device)
            with tempfile.TemporaryDirectory() as folder:  # every rank writes its shards; Ray Train merges them
                engine.save_checkpoint(folder, tag=STATE_TAG, client_state={"step": step + 1})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    module = engine.module.eval()
    metrics["loss"] = mean_over_ranks(metrics["loss"], device)
    metrics["rank_spread"] = rank_spread(module, device) if params.zero_stage < 3 else None
    # Under ZeRO-3 every rank gathers the whole model for rank 0 to save: it must fit one worker's GPU.
    whole = deepspeed.zero.GatheredParameters(list(module.parameters())) if params.zero_stage == 3 else nullcontext()
    with whole, tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            module.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


TRIAL_CPUS = 0.01
"""CPUs of warm.cpus_per_trial that a Tune trial holds for itself: it only waits on its Ray Train
run, whose workers share the rest."""


def fine_tune(config: dict, params: WarmParams, starts: list[str], storage: str, **worker_config) -> None:
    """One Ray Tune trial: fine-tune m as a Ray Train run of warm.workers_per_rm DeepSpeed workers."""
    m, workers, gpus = config["m"], params.workers_per_rm, params.gpus_per_worker
    trainer = ray.train.torch.TorchTrainer(
        fine_tune_worker,
        train_loop_config={**params.trial(m), "start": starts[m % len(starts)], "params": params, **worker_config},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={
                "CPU": (params.cpus_per_trial - TRIAL_CPUS) / workers,
                **({"GPU": gpus} if gpus else {}),
            },
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"rm_{m}",
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=params.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # a 7B RM's Adam state: about 100 GB
            callbacks=[TuneReportCallback()],  # every report of rank 0, the checkpoint's path with it, reaches Tune
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as error:
        # Ray Train has spent warm.max_failures restarts. Reported rather than raised: Tune would start the
        # trial again, with a fresh Ray Train run and as many restarts again (Tune's are for a lost trial).
        tune.report({"index": m, "failed": f"{type(error).__name__}: {error}"})
