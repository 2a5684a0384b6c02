"""The drivers of `warp-ray train-rm`, `warp`, `soup`, `eval` and `compare`, on the process that
submits the work: find the inputs (the built-in task unless the config names others), check them
before Ray starts, then hand the work to Ray (WARM's Tune trials; WARP's coordinator actor; a
rewarded soup's learners and reward servers; the evaluator's reward servers, SFT reference and
a vLLM engine, started once for models that differ only in their weights)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import ray
from ray.exceptions import RayActorError
from rich.console import Console
from transformers import AutoTokenizer

from warp_ray.checkpoint import same_model
from warp_ray.config import WarpConfig
from warp_ray.config_io import check_paths
from warp_ray.coordinator.checkpoints import last_complete
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.inputs import check_model_inputs, check_preferences, check_run_inputs
from warp_ray.data import preference_splits, prompt_splits, read_prompts
from warp_ray.errors import ConfigError, WarpRayError
from warp_ray.evaluation import Evaluator, mean_and_se, start_reference, summarise
from warp_ray.learner.learner import engine_args
from warp_ray.merge.folders import check_same_tokenizer
from warp_ray.progress import ProgressBoard, show_until_done
from warp_ray.reward.server import RewardServer, RewardSource, start_reward_server
from warp_ray.reward.warm import TRAINED_ON, accuracy_table, is_trained_on, markdown, train_warm, trained_on
from warp_ray.rollout.worker import RolloutWorker
from warp_ray.runtime import gpu_options, init_ray, link_worker_logs, remote_message
from warp_ray.soups.rewards import check_soup_rewards, check_text_prompts, reward_sources
from warp_ray.soups.soup import rewarded_soups
from warp_ray.task import world
from warp_ray.task.build import task_inputs

log = logging.getLogger(__name__)


def run_warm(config: WarpConfig, console: Optional[Console] = None) -> dict[str, dict[str, float]]:
    """`warp-ray train-rm`: WARM on the configured data (the built-in task by default), evaluated.
    With a `console`, the stages are said there and Ray's and its workers' output stays in log files."""
    check_paths(config.paths)
    sft, _, preferences, sft_checkpoints = task_inputs(config, prompts=False)
    splits = preference_splits(preferences)
    log.info("memory of a WARM worker, estimated: %s", check_preferences(config, sft, splits))
    _start_ray(config, console)
    _say(console, f"WARM: {config.warm.M} reward models fine-tuned from {sft} as Ray Train runs, then averaged")
    out = config.paths.output_dir / "rm"
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAINED_ON).unlink(missing_ok=True)  # until every model is retrained, the folder holds none of a known run
    folders = train_warm(
        config.warm, sft, splits, out, sft_checkpoints, config.paths.trust_remote_code, config.data, console is None
    )
    table = accuracy_table(folders, out / "warm", splits, config.warm, config.data, config.paths.trust_remote_code)
    (out / "accuracy.json").write_text(json.dumps(table, indent=2))
    (out / "accuracy.md").write_text(markdown(table))
    (out / TRAINED_ON).write_text(json.dumps(trained_on(config, sft, preferences)))
    return table


def run_warp(config: WarpConfig, resume: bool = False, console: Optional[Console] = None) -> Path:
    """`warp-ray warp`: the inputs (the built-in task unless the config names others; the WARM
    reward model, trained first unless given, already trained on these inputs with these settings,
    or warp.proxy_reward is gold), then Algorithm 1 in the coordinator actor. With a `console`,
    the stages and the learners' steps are shown there (`warp_ray.progress`) and Ray's and its
    workers' output stays in log files."""
    sft, prompts, reward, control = _inputs(config, train_warm=True, console=console)
    memory = check_run_inputs(config, sft, prompts, [Path(folder) for folder in reward.folders])
    log.info("memory of a learner rank, estimated: %s", memory)
    _start_ray(config, console)
    board = ProgressBoard.remote() if console is not None else None
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(config, sft, prompts, reward, control, board)
    failed = True
    try:
        run = coordinator.run.remote(resume)
        last = ray.get(run) if console is None else show_until_done(run, board, console)
        failed = False
        return last
    except RayActorError as e:
        if e.actor_init_failed:  # its constructor raised: a reward server, the reference, W&B's login
            raise WarpRayError(f"the coordinator failed to start: {remote_message(e)}") from None
        raise WarpRayError(f"the coordinator's process died ({type(e).__name__}); {_resume_hint(config)}") from None
    finally:
        try:
            ray.get(coordinator.close.remote(failed))
        except RayActorError:
            pass  # the coordinator is gone, and its learners with it
        if board is not None:
            ray.kill(board)


def run_soup(config: WarpConfig, console: Optional[Console] = None) -> dict:
    """`warp-ray soup`: rewarded soups of the policies trained on each of `rewards`, against the
    multi-objective RL baseline, for each seed (`warp_ray.soups.soup`), on the built-in task unless
    the config names other inputs; the rewards, the prompts against every context and the memory
    checked first. Returns the summary over the seeds."""
    check_paths(config.paths)
    reward_models = check_soup_rewards(config)
    sft, prompts, _, _ = task_inputs(config, preferences=False)
    check_text_prompts(config, prompts)
    memory = check_run_inputs(config, sft, prompts, reward_models)
    log.info("memory of a learner rank, estimated: %s", memory)
    rewards = reward_sources(config, config.paths.output_dir / "rewards")
    _start_ray(config, console)
    return rewarded_soups(config, sft, prompts, rewards, lambda stage: _say(console, stage))


def _inputs(
    config: WarpConfig, train_warm: bool, console: Optional[Console] = None
) -> tuple[Path, Path, RewardSource, Optional[Callable]]:
    """The SFT, the prompts, the proxy reward and the control reward (the built-in task's gold
    reward, or None) of a run: the built-in task's unless the config names others. The proxy is
    paths.reward_model, the gold reward (warp.proxy_reward), or the WARM trained on these inputs
    with these settings: trained first when `train_warm`, else required."""
    check_paths(config.paths)
    builtin = config.paths.sft_model is None
    gold = builtin and config.warp.proxy_reward == "gold"
    if builtin:
        _say(console, f"the built-in task: in {config.paths.output_dir / 'task'} (built there once, in minutes)")
    sft, prompts, preferences, _ = task_inputs(config, preferences=config.paths.reward_model is None and not gold)
    if config.paths.reward_model is not None:
        reward = RewardSource(folders=(str(config.paths.reward_model),))
    elif gold:
        reward = RewardSource(function=world.gold_reward)
    else:
        if not is_trained_on(config, sft, preferences):  # none yet, or trained on another task or with other settings
            if train_warm:  # the policy, its prompts and its memory checked first: WARM takes minutes
                check_run_inputs(config, sft, prompts)
            else:
                raise ConfigError(
                    f"no reward model trained on these inputs with these settings in {config.paths.output_dir / 'rm'}: "
                    "give paths.reward_model, or run `warp-ray train-rm` with this config first"
                )
            run_warm(config, console)
        reward = RewardSource(folders=(str(config.paths.output_dir / "rm" / "warm"),))
    return sft, prompts, reward, world.gold_reward if builtin else None


def run_eval(config: WarpConfig, models: Sequence[Path], console: Optional[Console] = None) -> dict[str, dict]:
    """`warp-ray eval`: each policy of `models` on the held-out prompts, as a run's evaluations measure
    it: the proxy reward, the control reward where there is one, the KL to the SFT and the share of
    completions cut by warp.max_new_tokens, each with its standard error over prompts; by folder."""
    if len(set(models)) < len(models):
        raise ConfigError(f"--model names a folder twice: {[str(m) for m in models]}; give each model once")
    with _evaluation(config, models, console) as sample_from:
        return {
            str(model): {k: v for k, v in summarise(sample_from(model)).items() if not k.endswith("_by_prompt")}
            for model in models
        }


def run_compare(
    config: WarpConfig, a: Path, b: Path, reward: str = "reward", console: Optional[Console] = None
) -> dict[str, float]:
    """`warp-ray compare`: how often policy `a`'s completion beats policy `b`'s under `reward`
    ("reward": the proxy; "control_reward"), each drawn for the same held-out prompt with the same
    seed; ties count a half. The interval is 95%, prompts being the unit of its standard error."""
    if reward == "control_reward" and config.paths.sft_model is not None:
        raise ConfigError("there is no control reward for your own inputs: the built-in task's gold reward is one")
    with _evaluation(config, [a, b], console) as sample_from:
        rows = [
            {"prompt": x["prompt"], "win": 1.0 if x[reward] > y[reward] else 0.5 if x[reward] == y[reward] else 0.0}
            for x, y in zip(sample_from(a), sample_from(b))
        ]
    rate, se = mean_and_se(rows, "win")
    return {"win_rate": rate, "low": max(0.0, rate - 1.96 * se), "high": min(1.0, rate + 1.96 * se), "pairs": len(rows)}


@contextmanager
def _evaluation(
    config: WarpConfig, models: Sequence[Path], console: Optional[Console]
) -> Iterator[Callable[[Path], list[dict]]]:
    """A function that samples the held-out rows of one of `models` (model folders) on a vLLM engine
    and measures them with the run's evaluator (its reward servers and the SFT reference, on Ray),
    every model's inputs checked before anything starts, as a run's are. A model the same as the
    last but for its weights (`same_model`: two checkpoints of one run, say) is loaded into the
    last one's engine, not given a new engine: the samples depend on the weights alone (each is
    seeded), and an engine takes seconds to start here, longer on a GPU."""
    sft, prompts, reward, control = _inputs(config, train_warm=False, console=console)
    check_model_inputs(config, sft, prompts, [Path(folder) for folder in reward.folders])
    for model in models:
        check_same_tokenizer([Path(sft), Path(model)], "the KL to the SFT compares token ids of one tokenizer")
        check_model_inputs(config, model, prompts, key="--model")
    _start_ray(config, console)
    trust = config.paths.trust_remote_code
    services = [
        start_reward_server(reward, config.reward_server, trust),
        start_reference(sft, config),
        *([RewardServer.remote(RewardSource(function=control))] if control else []),
    ]
    evaluator = Evaluator(config, read_prompts(prompt_splits(prompts)["held_out"], config.data), *services)
    engine, built_for = None, None

    def sample_from(model: Path) -> list[dict]:
        nonlocal engine, built_for
        if engine is not None and same_model(built_for, model):
            ray.get(engine.load_folder.remote(str(model)))
        else:
            if engine is not None:
                ray.kill(engine)
                engine = None
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust)
            options = gpu_options(config.resources.gpus_per_engine)
            args = engine_args(config, model, tokenizer)
            engine = RolloutWorker.options(**options).remote(str(model), seed=config.warp.seed, **args)
            built_for = model
        _say(console, f"sampling {config.evaluation.prompts} held-out prompts from {model}")
        return evaluator.samples([engine])

    try:
        yield sample_from
    finally:
        for actor in [*services, engine] if engine is not None else services:
            ray.kill(actor)


def _start_ray(config: WarpConfig, console: Optional[Console]) -> None:
    """Ray, its workers' output on this console (no `console`) or only in their log files, linked
    from <output_dir>/logs/ray."""
    init_ray(log_to_driver=console is None)
    if console is not None:
        link_worker_logs(config.paths.output_dir / "logs" / "ray")


def _say(console: Optional[Console], stage: str) -> None:
    if console is not None:
        console.print(stage, style="bold")


def _resume_hint(config: WarpConfig) -> str:
    done = last_complete(config.paths.output_dir)
    where = config.paths.output_dir
    complete = "no iteration was complete" if done is None else f"iterations up to {done} are complete in {where}"
    return complete + ": run the same command with --resume to continue"
