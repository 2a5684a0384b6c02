"""What a run shows on its console: the stage it is in and one line per learner (step, reward, KL).

The learners report each step to a `ProgressBoard` actor and the coordinator its stage; the
driver reads the board twice a second and draws it (`show_until_done`), a finished stage staying
on screen as one line per learner. A console that is no terminal (a Ray job's log, a file, a
notebook) or a dumb one is not redrawn: it gets each stage's line once, as the stage begins, its
learners' lines every `LOG_EVERY_S` while they move, and their last lines as it ends. Without
--verbose, the processes of Ray, vLLM and DeepSpeed write only to their log files (Ray's `logs/`
folder of the session, linked from the run's `<output_dir>/logs/ray`), so the console holds these
lines and errors alone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator

import ray
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The run's stages in order, each with its learners' last steps: the coordinator starts a
    stage, the learners report to the latest."""

    def __init__(self):
        self.stages: list[tuple[str, dict[str, dict]]] = []

    def set_stage(self, stage: str) -> None:
        self.stages.append((stage, {}))

    def update(self, learner: str, step: int, steps: int, reward: float, kl: float) -> None:
        if not self.stages:
            self.stages.append(("", {}))
        self.stages[-1][1][learner] = {"step": step, "steps": steps, "reward": reward, "kl": kl}

    def since(self, first: int) -> list[tuple[str, dict[str, dict]]]:
        return self.stages[first:]


LOG_EVERY_S = 60.0
"""Without a terminal, how often a running stage's learners each get a line: at most a minute behind,
about 60 lines an hour per learner in a job's log."""


def learners_table(learners: dict[str, dict]) -> Table:
    """A row per learner: its step, reward and KL to its anchor."""
    table = Table(box=None, pad_edge=False)
    for column in ("learner", "step", "reward", "KL to anchor"):
        table.add_column(column, justify="left" if column == "learner" else "right")
    for name, row in sorted(learners.items()):
        table.add_row(name, f"{row['step']}/{row['steps']}", f"{row['reward']:.3f}", f"{row['kl']:.3f}")
    return table


def board_view(stage: str, learners: dict[str, dict]) -> Group:
    """The stage, then its learners' table."""
    return Group(Text(stage, style="bold"), *([learners_table(learners)] if learners else []))


def board_polls(ref: ray.ObjectRef, board: ray.actor.ActorHandle) -> Iterator[tuple[bool, int, list]]:
    """Every half second until `ref` is ready, and once when it is: (whether it is, the index of the
    first stage not yet ended, the stages from that one on). A stage has ended once a later one began,
    or the run did."""
    ended = 0
    while True:
        done = bool(ray.wait([ref], timeout=0.5)[0])
        stages = ray.get(board.since.remote(ended))
        yield done, ended, stages
        if done:
            return
        ended += max(0, len(stages) - 1)


def show_until_done(
    ref: ray.ObjectRef, board: ray.actor.ActorHandle, console: Console, log_every_s: float = LOG_EVERY_S
) -> Any:
    """ray.get(ref), drawing the board's latest stage meanwhile; each stage stays on screen once it ends.
    A console that cannot be redrawn (no terminal, or a dumb one) is printed to instead, its learners'
    lines every `log_every_s`."""
    if not console.is_terminal or console.is_dumb_terminal:
        return log_until_done(ref, board, console, log_every_s)
    with Live(Group(), console=console, refresh_per_second=2, transient=True) as live:
        for done, _, stages in board_polls(ref, board):
            for stage in stages[: None if done else -1]:  # ended: a later one began, or the run did
                live.console.print(board_view(*stage))
            live.update(board_view(*stages[-1]) if stages and not done else Group())
    return ray.get(ref)


def log_until_done(ref: ray.ObjectRef, board: ray.actor.ActorHandle, console: Console, every_s: float) -> Any:
    """ray.get(ref), printing to a console that cannot be redrawn: each stage's line once, as it begins;
    every `every_s` while it runs, its learners' lines if they moved; at its end, their last lines if
    not already printed."""
    begun = 0  # stages whose line is printed
    logged: dict[str, dict] = {}  # the learners' rows last printed
    logged_at = time.monotonic()
    for done, ended, stages in board_polls(ref, board):
        for index, (stage, learners) in enumerate(stages, start=ended):
            over = done or index < ended + len(stages) - 1  # the run ended, or a later stage began
            if index == begun:
                console.print(Text(stage, style="bold"))
                begun, logged, logged_at = index + 1, {}, time.monotonic()
            if learners and learners != logged and (over or time.monotonic() - logged_at >= every_s):
                console.print(learners_table(learners))
                logged, logged_at = learners, time.monotonic()
    return ray.get(ref)


def quiet_libraries() -> None:
    """This process's libraries quiet on the console, as its workers' are: transformers' loading
    bars and warnings, Ray's and Ray Tune's info lines, vLLM's import notices; errors still show.
    vLLM reads its log level when imported, so it is imported here at ERROR (where it is installed),
    the environment then restored whole for the workers Ray starts, whose log files keep vLLM's
    info lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    environment = dict(os.environ)  # vLLM's import sets variables of its own too
    os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass  # a driver without vLLM: its engines run on the cluster
    finally:
        os.environ.clear()
        os.environ.update(environment)
