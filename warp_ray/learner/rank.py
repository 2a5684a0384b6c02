"""One DeepSpeed rank of a learner, as a Ray actor (or, colocated in a learner of one rank, in its
learner's actor): the policy, its anchor, the update, and with resources.colocate a vLLM engine.

A learner is K such ranks with torch.distributed between them (gloo on CPU, NCCL on GPU).
Each rank holds its share of the batch; DeepSpeed averages the gradients (ZeRO stage from
the config) so every rank ends each step with the same policy, and every rank updates its
own copy of the anchor the same way. Under ZeRO-3 the anchor is sharded like the policy
(a DeepSpeed engine of its own, without optimizer) and each rank moves only its shard
towards its shard of the policy; reading full weights is then a collective that every rank
joins, one tensor at a time.

The maths of a step runs on the rank's device in policy_update.py, which needs only torch and
transformers; this actor adds the process group, DeepSpeed and the weights' ways out.
"""

from __future__ import annotations

import gc
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import ray
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig, WarpParams
from warp_ray.learner import policy_update
from warp_ray.learner.policy_update import Batch
from warp_ray.merge import ema_update_
from warp_ray.reward.model import set_dropout
from warp_ray.rollout import weight_group
from warp_ray.rollout.worker import Engine
from warp_ray.runtime import actor_device, environment_ninja_first
from warp_ray.shards import join

WeightSpecs = list[tuple[str, str, list[int]]]


def deepspeed_config(config: WarpConfig) -> dict:
    warp, resources, micro = config.warp, config.resources, config.micro_batch_size
    # Weight decay named explicitly: torch's AdamW, which DeepSpeed builds for "Adam", decays by 0.01 otherwise.
    adam = {"lr": warp.lr, "weight_decay": warp.weight_decay, "torch_adam": True, "adam_w_mode": True}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": config.rank_rows // micro,
        "train_batch_size": config.rank_rows * resources.ranks_per_learner,
        "optimizer": {"type": "Adam", "params": adam},
        "zero_optimization": {"stage": resources.zero_stage},
        "bf16": {"enabled": resources.precision == "bf16"},
        "gradient_clipping": 1.0,
    }


def linear_warmup(warmup_steps: int) -> Callable[[torch.optim.Optimizer], LambdaLR]:
    """The learning rate times (s + 1) / warmup_steps at optimizer step s = 0, 1, ..., then times 1:
    the first step already moves the policy (DeepSpeed's WarmupLR would hold it at 0)."""
    return lambda optimizer: LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def anchor_config(micro_batch: int, world_size: int) -> dict:
    """ZeRO-3 anchor: float32 shards, so that EMA steps of mu * (policy - ema) are not rounded
    away, and no parameter kept whole between forwards: a whole copy would miss EMA updates."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


class LearnerRank:
    def __init__(self, rank: int, world_size: int, config: WarpConfig):
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.zero3 = config.resources.zero_stage == 3
        self.engine = self.anchor = None
        self.device = actor_device(config.resources.gpus_per_rank, f"learner rank {rank}")
        if self.device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(config.resources.threads_per_rank)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port on it, for the process group."""
        return weight_group.free_address()

    def setup(self, master_addr: str, master_port: int, sft: str | Path) -> None:
        """Join the learner's process group; every rank calls it at once."""
        # DeepSpeed without its launcher needs these, LOCAL_RANK included, or it tries MPI discovery.
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        import deepspeed

        environment_ninja_first()
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.sft = str(sft)

    def start(self, seed: int, *init: Mapping[str, torch.Tensor], warp: Optional[WarpParams] = None) -> None:
        """A new RL run from the init, given as shards (none: the SFT policy): fresh optimizer
        state and warm-up, and the anchor reset to the init (EMA) or to the SFT; every rank calls
        it at once. `warp`: the run's RL settings, when they replace the config's (`Learner.set_weights`
        checked them)."""
        import deepspeed

        if warp is not None:
            self.config = self.config.model_copy(update={"warp": warp})
        self._free()
        torch.manual_seed(seed)
        init = join(init) if init else None
        anchor_weights = init if self.config.warp.anchor == "ema" else None
        policy_config = deepspeed_config(self.config)
        anchor_zero3 = anchor_config(self.config.micro_batch_size, self.world_size)
        policy = self._load(init, policy_config)
        if self.config.resources.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.train()  # transformers checkpoints activations in training mode only; dropout is off
        anchor = self._load(anchor_weights, anchor_zero3)
        del init, anchor_weights
        self.engine, *_ = deepspeed.initialize(
            model=policy,
            model_parameters=policy.parameters(),
            config=policy_config,
            lr_scheduler=linear_warmup(self.config.warp.warmup_steps),
        )
        if self.zero3:
            anchor.eval().requires_grad_(False)
            self.anchor, *_ = deepspeed.initialize(model=anchor, config=anchor_zero3)
        else:
            self.anchor = policy_update.frozen(anchor, self.device)

    def _free(self) -> None:
        """Release the last run's engine, optimizer state and anchor before building the next: held
        while the next is built, they would double the rank's memory at every run."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine.optimizer = self.engine.lr_scheduler = None
        if self.zero3 and self.anchor is not None:
            self.anchor.destroy()
        self.engine = self.anchor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self, weights: Optional[Mapping[str, torch.Tensor]], zero3_config: dict) -> nn.Module:
        """The SFT's architecture with `weights` (None: the SFT's own), in float32 (under ZeRO-3, in the
        dtype of `zero3_config`), without dropout. Under ZeRO-3 it is built already cut into this
        rank's shards (DeepSpeed would otherwise move it to the device whole before partitioning it:
        a 7B float32 anchor alone fills a 40 GB GPU), and its weights are loaded one tensor at a time."""
        trust = self.config.paths.trust_remote_code
        # As the engines sample: the log-probs must be of the same policy, in training mode too.
        architecture = set_dropout(AutoConfig.from_pretrained(self.sft, trust_remote_code=trust), 0.0)
        if self.zero3:
            import deepspeed

            # The dtype from the config (bf16 or float32); given as an argument, DeepSpeed 0.19 takes
            # float16 or bfloat16 instead wherever the device supports it.
            # No random init: its writes (an embedding's padding row) would index the empty local shards.
            with deepspeed.zero.Init(config_dict_or_path=zero3_config), no_init_weights():
                model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32, trust_remote_code=trust)
            model.tie_weights()  # no_init_weights skipped it with the init: tied weights are one parameter
            self._load_partitioned(model, weights if weights is not None else load_model_weights(self.sft))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                self.sft, config=architecture, dtype=torch.float32, trust_remote_code=trust
            )
            if weights is not None:
                missing, unexpected = model.load_state_dict(weights, strict=False)
                missing = set(missing) - set(model.all_tied_weights_keys)  # saved once, under the name they are tied to
                self._check_fit(missing, unexpected)
        for module in model.modules():  # dropout under names DROPOUT_KEYS does not list
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model.eval()

    def _load_partitioned(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Each of the model's weights (tied ones once, under their saved name) gathered in turn, set
        from rank 0's copy, and cut again."""
        import deepspeed

        names = dict(model.named_parameters())
        self._check_fit(set(names) - set(weights), set())
        # Every rank holds `weights`, so every rank finds a wrong shape and none waits in a gather.
        wrong = [
            f"{n} {tuple(weights[n].shape)} for {tuple(p.ds_shape)}"
            for n, p in names.items()
            if weights[n].shape != p.ds_shape
        ]
        if wrong:
            raise ValueError(f"the init's weights do not fit the policy {self.sft}: shapes {wrong[:5]}")
        for name, p in names.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(weights[name])

    def _check_fit(self, missing: set[str], unexpected: set[str]) -> None:
        if missing or unexpected:
            raise ValueError(
                f"the init's weights do not fit the policy {self.sft}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )

    def step(self, batch: Batch) -> dict[str, float]:
        """One REINFORCE step on this rank's share of the batch, in micro-batches, then the EMA step."""
        warp = self.config.warp
        lr = self.engine.get_lr()[0]  # the rate of this step, before the scheduler moves it

        def backward(loss: torch.Tensor) -> None:
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer after the last micro-batch only

        stats = policy_update.reinforce_step(
            self.engine,
            self.anchor,
            batch,
            self.device,
            backward,
            beta=warp.beta,
            temperature=warp.temperature,
            samples_per_prompt=warp.samples_per_prompt,
            baseline=warp.baseline,
            micro_batch_size=self.config.micro_batch_size,
            logprob_chunk=self.config.resources.logprob_chunk,
            anchor_dtype=policy_update.anchor_scoring_dtype(
                self.config.resources.precision, self.config.resources.zero_stage
            ),
        )
        if warp.anchor == "ema":
            self.update_ema_anchor()
        return {
            **{k: v.item() for k, v in stats.items()},
            "lr": lr,
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            # the run's settings, logged with each step as lr is: a run's log says which run it is
            "beta": warp.beta,
            "anchor_mu": warp.mu if warp.anchor == "ema" else 0.0,  # 0: the SFT anchor, which stays put
        }

    def update_ema_anchor(self) -> None:
        """WARP's stage 1, after every optimizer step: the KL anchor follows the policy,
        theta_ema <- (1 - mu) * theta_ema + mu * theta (docs/algorithms.md#stage-1-the-ema-anchor)."""
        ema_update_(*self._local_weights(), self.config.warp.mu)

    def _local_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The anchor's and the policy's weights as this rank holds them: whole, or its ZeRO-3 shards."""

        def held(module: nn.Module) -> dict[str, torch.Tensor]:
            return {n: p.ds_tensor if self.zero3 else p for n, p in module.named_parameters()}

        return held(self.anchor.module if self.zero3 else self.anchor), held(self.engine.module)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (token ids) of the current policy. Under ZeRO-3 every rank must run it
        with the same prompts (each forward gathers)."""
        return policy_update.greedy(self.engine.module, prompt_ids, max_new_tokens, synced_gpus=self.zero3)

    def _full_tensors(self, module: nn.Module, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) of every weight; tied ones once, under the name a saved checkpoint
        keeps, or (`tied`) under each of their names, as vLLM's in-place reload needs them (it
        re-processes only the layers whose weights it is given). Under ZeRO-3 each tensor is
        gathered in turn (a collective) and valid until the next one."""
        import deepspeed

        for name, p in module.named_parameters(remove_duplicate=not tied):
            with deepspeed.zero.GatheredParameters([p]) if self.zero3 else nullcontext():
                yield name, p.data

    def _state_dict(self, module: nn.Module, tied: bool) -> Optional[dict[str, torch.Tensor]]:
        if self.rank == 0 or not self.zero3:
            return policy_update.host_copy(self._full_tensors(module, tied))
        for _ in self._full_tensors(module, tied):  # under ZeRO-3 the other ranks take part in each gather
            pass
        return None

    def policy_state_dict(self, tied: bool = False) -> Optional[dict[str, torch.Tensor]]:
        """The whole policy in float32 (`tied`: tied weights under each name, for the engines).
        Under ZeRO-3 every rank must call it (it gathers) and only rank 0 returns it, the others
        None, so that one copy enters the object store."""
        return self._state_dict(self.engine.module, tied)

    def anchor_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole anchor in float32, as `policy_state_dict`."""
        return self._state_dict(self.anchor.module if self.zero3 else self.anchor, tied=False)

    def start_engine(self, model: str, seed: int, **engine) -> None:
        """resources.colocate: start this process's vLLM engine (`warp_ray.rollout.worker.Engine`'s
        arguments), after `setup`, every rank at once: vLLM builds its groups over the ranks' process
        group (each engine's tensor-parallel group is its rank alone), and building a group is a
        collective. On the CPU, vLLM then refuses `torch.set_num_threads` in this process: the rank's
        count, set when it started, stays."""
        self.colocated = Engine(model, seed=seed, **engine)

    def generate(self, *args) -> list[list[dict]]:
        """The colocated engine's `generate`: the rank stands in for a rollout worker."""
        return self.colocated.generate(*args)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """The colocated engine's `update_weights`: other weights (a point of the LITI front)."""
        return self.colocated.update_weights(state_dict)

    def sync_engine(self) -> None:
        """Hand the policy to the colocated engine in memory, every name (tied ones under each). Under
        ZeRO-3 every rank must call it at once: each tensor is gathered."""
        self.colocated.load_weights(self._full_tensors(self.engine.module, tied=True))

    def weight_specs(self) -> WeightSpecs:
        """(name, dtype, shape) of what `broadcast_weights` sends, in its order."""
        return [
            (name, str(p.dtype).removeprefix("torch."), list(p.ds_shape if self.zero3 else p.shape))
            for name, p in self.engine.module.named_parameters(remove_duplicate=False)
        ]

    def join_weight_group(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 only: become rank 0 of the broadcast group with the rollout engines."""
        self.weight_group = weight_group.join(address, port, 0, world_size)

    def broadcast_weights(self) -> None:
        """Send the policy to the rollout engines, tensor by tensor, in its training dtype.
        Under ZeRO-3 every rank must call it (each tensor is gathered); rank 0 sends."""
        for _, tensor in self._full_tensors(self.engine.module, tied=True):
            if self.rank == 0:
                weight_group.broadcast_(self.weight_group, tensor.detach().contiguous())
        if self.rank == 0 and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NCCL's wait orders the stream, not this process


RemoteLearnerRank = ray.remote(LearnerRank)
"""A rank as an actor of its own. A colocated learner's one rank is instead hosted in its learner's actor."""
