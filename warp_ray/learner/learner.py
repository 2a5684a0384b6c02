"""A learner: one RL run of T REINFORCE steps, its K DeepSpeed ranks and its rollout workers.

Each step: draw prompts (without replacement within an epoch, in the learner's own order from its
seed), sample completions from
the rollout workers, score them on the reward server, update the policy on the K ranks
(each on whole prompts' groups of samples, so the leave-one-out baseline stays within a
prompt), then, every `resources.sync_every` steps, push the new weights to the rollout
workers. The coordinator starts each WARP iteration with `set_weights(init, seed)` and
reads the result, sharded for its merge, with `put_weights(layout)`; processes and engines
live across iterations.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from warp_ray.chat import Prompt, policy_ids, with_padding
from warp_ray.checkpoint import context_length
from warp_ray.config import WarpConfig, WarpParams
from warp_ray.errors import NonFiniteError, StartupError
from warp_ray.evaluation import Evaluator
from warp_ray.learner.policy_update import Batch
from warp_ray.learner.rank import LearnerRank, RemoteLearnerRank
from warp_ray.logprobs import pack
from warp_ray.rollout.worker import RolloutWorker, sample
from warp_ray.runtime import InProcess, gpu_options, remote_message
from warp_ray.shards import Layout, Shards, join, split

log = logging.getLogger(__name__)


def engine_args(config: WarpConfig, folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> dict:
    """A `RolloutWorker`'s arguments for the model in `folder` under the config, but for its seed."""
    resources, trust = config.resources, config.paths.trust_remote_code
    return dict(
        max_model_len=context_length(folder, tokenizer, trust),
        dtype="bfloat16" if resources.precision == "bf16" else "float32",
        trust_remote_code=trust,
        in_process=resources.rollout_in_process or resources.colocate,
        gpu_memory_utilization=resources.engine_memory_utilization * (resources.gpus_per_engine or 1),
        enforce_eager=resources.enforce_eager,
    )


def bundles(config: WarpConfig) -> list[dict[str, float]]:
    """A learner's placement-group bundles: one per DeepSpeed rank, then one per vLLM engine; a
    colocated engine's CPUs join its rank's bundle instead."""
    r = config.resources
    if r.colocate:
        layout = [{"CPU": r.cpus_per_rank + r.cpus_per_rollout_worker, "GPU": r.gpus_per_rank}] * r.ranks_per_learner
    else:
        rank = {"CPU": r.cpus_per_rank, "GPU": r.gpus_per_rank}
        engine = {"CPU": r.cpus_per_rollout_worker, "GPU": r.gpus_per_rollout_worker}
        layout = [rank] * r.ranks_per_learner + [engine] * r.rollout_workers_per_learner
    return [{k: v for k, v in b.items() if v} for b in layout]


def check_finite(what: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise NonFiniteError naming the first tensor that holds NaN or Inf: a policy trained on such
    values, or holding them, must not reach the merge."""
    for name, t in tensors.items():
        if t.is_floating_point() and not (finite := torch.isfinite(t)).all():
            raise NonFiniteError(f"{what}: {name!r} has {int((~finite).sum())} NaN or Inf value(s) of {t.numel()}")


def _placement(config: WarpConfig, group: Optional[PlacementGroup]):
    """Actor options for bundle k: its resources inside the placement group, or, without one,
    the configured GPUs only (with no resource named, a Ray actor holds no CPU while it runs)."""

    def options(k: int) -> dict:
        bundle = bundles(config)[k]
        if group is None:
            return gpu_options(bundle.get("GPU", 0))
        return {
            "num_cpus": bundle["CPU"],
            "num_gpus": bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k),
        }

    return options


RUN_SETTINGS = {"anchor", "beta", "mu", "lr", "weight_decay", "warmup_steps", "baseline"}
"""What a run on a started learner may change (`Learner.set_weights`): the loss's and the optimizer's
settings, which the ranks read when a run starts. Sampling, batches and evaluation stay the config's."""


def hosts_rank(config: WarpConfig) -> bool:
    """Whether a learner's actor runs its rank (and the rank's engine) in its own process: colocated
    with one rank. With more, each rank is an actor hosting its engine, and the learner drives them."""
    return config.resources.colocate and config.resources.ranks_per_learner == 1


def learner_options(config: WarpConfig, group: Optional[PlacementGroup]) -> dict:
    """Ray options of a learner's own actor. When it hosts its one rank and that rank's engine
    (`hosts_rank`, `Learner(host_rank=True)`), it takes their bundle, or without a placement group
    their GPUs; otherwise its ranks and engines hold the resources and it holds none, placed in their
    group (on their node)."""
    if hosts_rank(config):
        return _placement(config, group)(0)
    return {"num_cpus": 0} | ({"scheduling_strategy": PlacementGroupSchedulingStrategy(group)} if group else {})


def evaluations(history: Sequence[dict]) -> list[dict]:
    """The held-out evaluations of a `Learner.run` history: step, and each `eval_*` metric without its prefix."""
    return [
        {"step": h["step"], **{k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_")}}
        for h in history
        if "eval_reward" in h
    ]


class PromptOrder:
    """Prompts in batches, without replacement within an epoch, each epoch shuffled anew by `rng`:
    a batch repeats a prompt only where it straddles two epochs."""

    def __init__(self, prompts: Sequence[Prompt], rng: random.Random):
        self.prompts = list(prompts)
        self.rng = rng
        self.queue = []

    def draw(self, count: int) -> list[Prompt]:
        while len(self.queue) < count:
            epoch = list(self.prompts)
            self.rng.shuffle(epoch)
            self.queue += epoch
        drawn, self.queue = self.queue[:count], self.queue[count:]
        return drawn


class Learner:
    def __init__(
        self,
        config: WarpConfig,
        sft: str | Path,
        prompts: Sequence[Prompt],
        reward_server,
        seed: int,
        evaluator: Optional[Evaluator] = None,
        placement_group: Optional[PlacementGroup] = None,
        host_rank: bool = False,
    ):
        """With a placement group (of `bundles(config)`), rank k takes bundle k and engine i bundle K + i.
        With resources.colocate, each rank runs an engine, and `rollouts` are the ranks themselves; with
        `host_rank` and one rank (`hosts_rank`), that rank runs in this process, a learner actor which
        must then hold the rank's resources (`learner_options`): the learner's one process. Otherwise
        (more ranks, or a learner built in a driver), each rank is an actor of its own."""
        if host_rank and ray.get_runtime_context().get_actor_id() is None:
            raise ValueError("host_rank: a learner hosts its rank in a learner actor (start_learner), not in a driver")
        resources = config.resources
        self.config = config
        self.host_rank = host_rank and hosts_rank(config)
        self.prompts = list(prompts)
        self.reward_server = reward_server
        self.evaluator = evaluator
        self.zero3 = resources.zero_stage == 3
        # Unless it hosts its rank, this actor holds no GPU itself: the engines' resources tell where they run.
        self.broadcast = config.broadcasts_weights
        self.weight_specs = None  # of the broadcast group, joined at the first sync
        self.ranks, self.rollouts = [], []
        self.startup_error: Optional[StartupError] = None
        try:
            self._start(sft, seed, placement_group)
        except Exception as error:
            self.startup_error = self._failed_to_start(error)

    def _start(self, sft: str | Path, seed: int, placement_group: Optional[PlacementGroup]) -> None:
        resources, trust = self.config.resources, self.config.paths.trust_remote_code
        K = resources.ranks_per_learner  # the config checked that K divides the batch
        self.tokenizer = with_padding(AutoTokenizer.from_pretrained(sft, trust_remote_code=trust))
        placed = _placement(self.config, placement_group)
        if self.host_rank:
            self.ranks = [InProcess(LearnerRank(0, K, self.config))]
        else:
            self.ranks = [RemoteLearnerRank.options(**placed(k)).remote(k, K, self.config) for k in range(K)]
        # The engines start (tens of seconds) while the ranks join their group.
        engine = engine_args(self.config, sft, self.tokenizer)
        self.rollouts = [
            RolloutWorker.options(**placed(K + i)).remote(str(sft), seed=seed + i, **engine)
            for i in range(0 if resources.colocate else resources.rollout_workers_per_learner)
        ]
        address, port = ray.get(self.ranks[0].rendezvous.remote())
        ray.get([rank.setup.remote(address, port, str(sft)) for rank in self.ranks])
        if resources.colocate:  # after the group, all ranks at once: each engine's vLLM joins the ranks' group
            ray.get([rank.start_engine.remote(str(sft), seed + k, **engine) for k, rank in enumerate(self.ranks)])
            self.rollouts = self.ranks
        self.set_weights(None, seed)

    def _failed_to_start(self, error: Exception) -> StartupError:
        """What failed to start, as an error that every later call raises: a retry would fail the
        same way. A death is raised again instead, which the learner group answers by starting the
        learner again: a process that died while starting, or a rank or engine found dead (its
        peers' errors, a broken process group, may arrive first)."""
        if isinstance(error, RayActorError) and not error.actor_init_failed:
            raise error
        # Every process at once, within a minute in all: one still starting, or blocked in a collective
        # with the one that failed (it answers no call meanwhile), is not dead. An InProcess is alive: this process.
        pending = [h.__ray_ready__.remote() for h in self.ranks + self.rollouts if not isinstance(h, InProcess)]
        deadline = time.monotonic() + 60
        while pending:
            answered, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not answered:
                break
            try:
                ray.get(answered[0])
            except RayActorError as death:
                if not death.actor_init_failed:
                    raise death from error
        # A creation task's death names its actor; a method's error only in its text ("actor_id=...").
        actor = getattr(error, "actor_id", None) or next(iter(re.findall(r"actor_id=([0-9a-f]{32})", str(error))), None)
        here = ray.get_runtime_context().get_actor_id()
        if actor is None and any(isinstance(r, InProcess) and r.raised is error for r in self.ranks):
            actor = here  # raised by the rank this process hosts, or by its engine
        hosted = ", with its colocated vLLM engine" if self.config.resources.colocate else ""

        def rank(k: int) -> str:
            return f"learner rank {k} (DeepSpeed{hosted})"

        components = {here: rank(0)} if self.host_rank else {}
        actors = [(f"rollout engine {i} (vLLM)", e) for i, e in enumerate(self.rollouts)]
        actors += [(rank(k), r) for k, r in enumerate(self.ranks)]  # a colocated engine is its rank: named so
        components |= {a._actor_id.hex(): name for name, a in actors if not isinstance(a, InProcess)}
        cause = remote_message(error)
        where = f"; its log: `ray logs actor --id {actor}`" if actor in components else ""
        return StartupError(f"{components.get(actor, 'the learner')} failed to start: {cause}{where}")

    def _check_started(self) -> None:
        if self.startup_error is not None:
            raise self.startup_error

    def _join_weight_group(self) -> None:
        address, port = ray.get(self.ranks[0].rendezvous.remote())
        size = 1 + len(self.rollouts)
        ray.get(
            [self.ranks[0].join_weight_group.remote(address, port, size)]
            + [r.join_weight_group.remote(address, port, 1 + i, size) for i, r in enumerate(self.rollouts)]
        )
        self.weight_specs = ray.get(self.ranks[0].weight_specs.remote())

    def set_weights(
        self, init: Optional[Mapping[str, torch.Tensor] | Shards], seed: int, warp: Optional[WarpParams] = None
    ) -> None:
        """Start a new RL run from `init` (None: the SFT), as Algorithm 1 does every iteration:
        fresh optimizer state and warm-up, the EMA anchor reset to `init`, the prompt order and
        sampling seeds of `seed`, the rollout engines synced and checked. The ranks read the
        init's shards from the object store (one copy per node; a learner that hosts its rank fetches
        them into its process); a dict is put there first. `warp`: this run's RL settings and the next
        runs', in place of the config's, which may differ in RUN_SETTINGS only (another anchor or beta
        on the same processes: the reproduction's baselines)."""
        self._check_started()
        config = self.config
        if warp is not None:
            changed = {k for k in WarpParams.model_fields if getattr(warp, k) != getattr(config.warp, k)}
            if changed - RUN_SETTINGS:
                raise ValueError(
                    f"a run on a started learner may change warp.{', warp.'.join(sorted(RUN_SETTINGS))} only, "
                    f"not warp.{', warp.'.join(sorted(changed - RUN_SETTINGS))}"
                )
            config = WarpConfig.model_validate({**config.model_dump(), "warp": warp.model_dump()})
        shards = [ray.put(init)] if isinstance(init, Mapping) else init or []
        ray.get([rank.start.remote(seed, *shards, warp=config.warp) for rank in self.ranks])
        self.config = config
        self.rng, self.steps = random.Random(seed), 0
        self.order = PromptOrder(self.prompts, self.rng)
        self.sync()
        self.check_engine_agrees(self.prompts[:4])

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The policy, whole, in float32: a state dict that safetensors can save as it is."""
        return ray.get(self._gathered("policy_state_dict"))[0]

    def put_weights(self, layout: Layout) -> Shards:
        """The policy into the object store (on this node), cut along the run's partition, for the
        merge; NonFiniteError if it holds NaN or Inf."""
        self._check_started()
        weights = self.get_weights()
        check_finite("the trained policy", weights)
        return [ray.put(shard) for shard in split(weights, layout)]

    def apply(self, fn: Callable, *args):
        """fn(*args) in this process, beside this learner's weights: the coordinator's merge work on
        a shard (warp_ray/coordinator/distributed_merge.py), between runs."""
        return fn(*args)

    def get_anchor_weights(self) -> dict[str, torch.Tensor]:
        """The KL anchor (the EMA, or the SFT), whole, in float32."""
        return ray.get(self._gathered("anchor_state_dict"))[0]

    def _gathered(self, method: str, *args) -> list[ray.ObjectRef]:
        """Call a rank method that reads whole weights (a state dict, a forward pass): rank 0's
        result first. Under ZeRO-3 every rank must take part in the gathers (one rank alone would
        wait for the others forever)."""
        return [getattr(rank, method).remote(*args) for rank in (self.ranks if self.zero3 else self.ranks[:1])]

    def sync(self) -> float:
        """Push the policy to every rollout engine; returns the seconds it took."""
        start = time.perf_counter()
        if self.broadcast and self.weight_specs is None:
            self._join_weight_group()
        if self.config.resources.colocate:  # every rank, at once: under ZeRO-3 each tensor is gathered by all
            ray.get([rank.sync_engine.remote() for rank in self.ranks])
        elif self.broadcast:
            receiving = [r.receive_weights.remote(self.weight_specs) for r in self.rollouts]
            ray.get([rank.broadcast_weights.remote() for rank in self.ranks] + receiving)
        else:
            weights = self._gathered("policy_state_dict", True)
            ray.get([r.update_weights.remote(weights[0]) for r in self.rollouts] + weights[1:])
        self.synced_at = self.steps
        return time.perf_counter() - start

    def check_engine_agrees(self, prompts: list[Prompt], tokens: int = 16) -> None:
        """The rollout engines must sample from the policy being trained: their greedy completions
        match. Exact in float32; in bf16 the two sides' kernels may round differently, so a
        mismatch is only reported."""
        ids = [policy_ids(self.tokenizer, p) for p in prompts]
        policy = ray.get(self._gathered("greedy", ids, tokens))[0]
        for i, rollout in enumerate(self.rollouts):
            engine = [c[0]["token_ids"] for c in ray.get(rollout.generate.remote(prompts, 1, 0.0, tokens))]
            if engine != policy:
                message = f"rollout engine {i} and the policy disagree on greedy completions: {engine} vs {policy}"
                if self.config.resources.precision == "fp32":
                    raise RuntimeError(message)
                log.warning("%s (bf16: expected now and then)", message)

    def run(
        self, steps: int, log_dir: Path | None = None, desc: str = "learner", progress: Optional[ActorHandle] = None
    ) -> list[dict[str, float]]:
        """`steps` REINFORCE steps with a progress bar, and a held-out evaluation (when the learner
        has an evaluator) every `evaluation.every` steps and after the last, its metrics under
        `eval_*`. With `log_dir`, each step's metrics go to metrics.jsonl and TensorBoard there;
        with `progress` (a `warp_ray.progress.ProgressBoard`), its step, reward and KL under `desc`."""
        self._check_started()
        every, history = self.config.evaluation.every, []
        writer = SummaryWriter(str(log_dir)) if log_dir is not None else None
        with tqdm(total=steps, desc=desc, unit="step") as bar:
            for i in range(steps):
                metrics = {"step": self.steps + 1, **self.step()}
                if self.evaluator is not None and ((every and metrics["step"] % every == 0) or i == steps - 1):
                    metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
                history.append(metrics)
                bar.update()
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl_to_anchor']:.3f}")
                if progress is not None:
                    progress.update.remote(desc, metrics["step"], steps, metrics["reward"], metrics["kl_to_anchor"])
                if writer is not None:
                    self._write(log_dir, writer, metrics)
        if writer is not None:
            writer.close()
        return history

    @staticmethod
    def _write(log_dir: Path, writer: SummaryWriter, metrics: dict[str, float]) -> None:
        with open(log_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step" and not isinstance(value, list):  # per-prompt lists: in metrics.jsonl only
                tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                writer.add_scalar(tag, value, metrics["step"])

    def evaluate(self) -> dict[str, float]:
        """Held-out reward, KL to the SFT and control reward of the current policy."""
        self._check_started()
        if self.synced_at != self.steps:
            self.sync()
        return self.evaluator(self.rollouts)

    def close(self) -> None:
        """Stop the learner's processes: its ranks and rollout engines. A rank this actor hosts ends
        with this actor: `ray.kill` it."""
        for actor in self.ranks + self.rollouts:
            if not isinstance(actor, InProcess):
                ray.kill(actor)

    def evaluate_weights(self, weights: Shards, per_sample: bool = False) -> dict[str, float] | list[dict]:
        """Held-out evaluation of other weights (a point of the LITI front) on this learner's
        engines, between runs; the next `set_weights` puts a policy back in them. per_sample:
        the evaluator's rows, one per sample, instead of their means."""
        self._check_started()
        weights = join(ray.get(weights))
        if not self.host_rank:  # one copy in the object store for every engine; a hosted rank takes the dict itself
            weights = ray.put(weights)
        ray.get([r.update_weights.remote(weights) for r in self.rollouts])
        del weights  # not held through the evaluation
        self.synced_at = None  # the engines no longer hold the policy
        return self.evaluator.samples(self.rollouts) if per_sample else self.evaluator(self.rollouts)

    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        warp = self.config.warp
        prompts = self.order.draw(warp.batch_size)
        # A seed per step from the run's seed: a run (or a resumed one) samples the same completions.
        samples = sample(
            self.rollouts,
            prompts,
            warp.samples_per_prompt,
            warp.temperature,
            warp.max_new_tokens,
            seed=self.rng.randrange(2**31),
        )
        rows = [(prompt, s) for prompt, group in zip(prompts, samples) for s in group]
        rewards = torch.tensor(
            ray.get(self.reward_server.score.remote([p for p, _ in rows], [s["text"] for _, s in rows]))
        )
        check_finite(f"step {self.steps + 1}", {"reward": rewards})
        rollout_seconds = time.perf_counter() - start
        input_ids, attention, completion = pack(
            [(s["prompt_token_ids"], s["token_ids"]) for _, s in rows], self.tokenizer.pad_token_id
        )
        sampled_logprobs = torch.zeros(completion.shape)
        # Row by row, left to right: the order of the completion tokens in `pack`'s rows.
        sampled_logprobs[completion.bool()] = torch.tensor([lp for _, s in rows for lp in s["logprobs"]])
        batch = Batch(input_ids, attention, completion, rewards, sampled_logprobs)
        share = self.config.rank_rows
        stats = ray.get([rank.step.remote(batch.rows(k * share, (k + 1) * share)) for k, rank in enumerate(self.ranks)])
        update_seconds = time.perf_counter() - start - rollout_seconds
        check_finite(f"step {self.steps + 1}", {"loss": torch.tensor([s["loss"] for s in stats])})
        self.steps += 1
        sync_seconds = self.sync() if self.steps % self.config.resources.sync_every == 0 else 0.0
        metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        seconds = time.perf_counter() - start
        metrics.update(
            seconds=seconds,
            rollout_seconds=rollout_seconds,
            update_seconds=update_seconds,
            sync_seconds=sync_seconds,
            tokens_per_s=int(completion.sum()) / seconds,
        )
        metrics["truncated"] = sum(s["truncated"] for _, s in rows) / len(rows)  # cut by warp.max_new_tokens
        return metrics
