"""One DeepSpeed rank of a learner, as a Ray actor: the policy, its anchor, the update.

A learner is K such ranks with torch.distributed between them (gloo on CPU, NCCL on GPU).
Each rank holds its share of the batch; DeepSpeed averages the gradients (ZeRO stage from
the config) so every rank ends each step with the same policy, and every rank updates its
own copy of the anchor the same way.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM

from warp_ray.config import WarpConfig
from warp_ray.learner.reinforce import reinforce_loss, token_logprobs
from warp_ray.merge import ema_update_


def deepspeed_config(config: WarpConfig, micro_batch: int) -> dict:
    warp, resources = config.warp, config.resources
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * resources.ranks_per_learner,
        "optimizer": {"type": "Adam", "params": {"lr": warp.lr, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": warp.lr,
                                                     "warmup_num_steps": max(1, warp.warmup_steps), "warmup_type": "linear"}},
        "zero_optimization": {"stage": resources.zero_stage},
        "bf16": {"enabled": resources.precision == "bf16"},
        "gradient_clipping": 1.0,
    }


@ray.remote
class LearnerRank:
    def __init__(self, rank: int, world_size: int, config: WarpConfig, micro_batch: int):
        self.rank, self.world_size, self.config, self.micro_batch = rank, world_size, config, micro_batch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(1)  # one thread per rank: more oversubscribes the cores

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port on it, for the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int, init: str | Path) -> None:
        """Join the process group and build the DeepSpeed engine; every rank calls it at once."""
        # DeepSpeed without its launcher needs these, LOCAL_RANK included, or it tries MPI discovery.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed

        model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        self.anchor = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval().requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=deepspeed_config(self.config, self.micro_batch))

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
             rewards: torch.Tensor) -> dict[str, float]:
        """One REINFORCE step on this rank's share: right-padded prompt + completion rows, their
        attention mask, a mask of the completion tokens, and one reward per row."""
        logits = self.engine(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        policy = token_logprobs(logits, input_ids[:, 1:])
        with torch.no_grad():
            log_probs = logits.float().log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
        with torch.no_grad():
            anchor = token_logprobs(self.anchor(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], input_ids[:, 1:])
        mask = completion_mask[:, 1:].float()
        warp = self.config.warp
        loss, stats = reinforce_loss(policy, anchor, mask, rewards, warp.beta, warp.samples_per_prompt, warp.baseline)
        self.engine.backward(loss)
        self.engine.step()
        if warp.anchor == "ema":
            ema_update_(self.anchor.state_dict(), self.engine.module.state_dict(), warp.mu)
        stats["loss"] = loss.item()
        stats["entropy"] = (entropy * mask).sum().item() / max(1.0, mask.sum().item())  # per completion token
        stats["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        stats["lr"] = self.engine.get_lr()[0]
        return stats

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (token ids) of the current policy, one prompt at a time (no padding)."""
        model, config = self.engine.module, self.engine.module.config
        completions = []
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
            completions.append(out[0, len(ids):].tolist())
        return completions

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy in float32 (ZeRO 0-2 keep whole parameters on every rank)."""
        return {k: v.detach().float().clone() for k, v in self.engine.module.state_dict().items()}

    def anchor_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.anchor.state_dict().items()}
