"""The console of a run, from a real progress board: on a terminal, every stage kept on screen once
it ends; on output that is no terminal (a Ray job's log, a file), stages and learners' lines as they
come, each once."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import ray
from rich.console import Console

from warp_ray.progress import ProgressBoard, show_until_done


@ray.remote(num_cpus=0)
def run_until(finished: str) -> str:
    """A run that ends when the test says so."""
    while not Path(finished).exists():
        time.sleep(0.05)
    return "the run's result"


class LoggedRun:
    """`show_until_done` on a console writing to a string, in a thread, over a board the test drives."""

    def __init__(self, tmp_path: Path, every_s: float, dumb_terminal: bool = False):
        # A terminal of TERM=dumb cannot be redrawn either; otherwise no terminal, whatever FORCE_COLOR says.
        self.console = Console(file=io.StringIO(), width=100, force_terminal=dumb_terminal)
        self.board, self.finished = ProgressBoard.remote(), tmp_path / f"finished_{every_s}"
        ref = run_until.remote(str(self.finished))
        self.thread = threading.Thread(
            target=lambda: setattr(self, "result", show_until_done(ref, self.board, self.console, every_s)),
            daemon=True,
        )
        self.thread.start()

    def text(self) -> str:
        return self.console.file.getvalue()

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in self.text():
            assert time.monotonic() < deadline, f"no {text!r} in {self.text()!r}"
            time.sleep(0.05)

    def step(self, learner: str, step: int) -> None:
        ray.get(self.board.update.remote(learner, step, 4, reward=0.5 * step, kl=0.01 * step))

    def end(self) -> str:
        """End the run; what the console got."""
        self.finished.touch()
        self.thread.join(timeout=60)
        ray.kill(self.board)
        assert getattr(self, "result", None) == "the run's result", f"no result within 60 s: {self.text()!r}"
        return self.text()


@pytest.fixture
def logged_run(ray_cluster, tmp_path):
    """Makes a LoggedRun; ends whatever run a failed test left waiting (its task holds a worker)."""
    made: list[LoggedRun] = []

    def make(every_s: float, dumb_terminal: bool = False) -> LoggedRun:
        made.append(LoggedRun(tmp_path, every_s, dumb_terminal))
        return made[-1]

    yield make
    for run in made:
        run.finished.touch()


def test_on_a_terminal_every_stage_stays_on_screen_with_its_learners_last_rows(ray_cluster, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    assert console.is_terminal and not console.is_dumb_terminal
    board = ProgressBoard.remote()
    for stage, steps in (("iteration 0", (1, 3)), ("iteration 1", (2,))):
        ray.get(board.set_stage.remote(stage))
        for step in steps:
            ray.get(board.update.remote("policy 0", step, 4, reward=0.5 * step, kl=0.01 * step))
    # A run already over at the first poll: its stages are on screen only if printed as ended, not drawn live.
    assert show_until_done(ray.put("the run's result"), board, console) == "the run's result"
    ray.kill(board)
    text = console.file.getvalue()
    assert text.count("iteration 0") == text.count("iteration 1") == 1
    assert text.index("iteration 0") < text.index("3/4") < text.index("iteration 1") < text.index("2/4")


def rows(text: str, learner: str) -> list[str]:
    """The steps printed on `learner`'s lines, in order."""
    return [line.removeprefix(learner).split()[0] for line in text.splitlines() if line.startswith(learner)]


def test_without_a_terminal_each_stage_is_printed_as_it_begins_and_its_learners_as_they_move(logged_run):
    run = logged_run(every_s=0.2)
    assert not run.console.is_terminal
    ray.get(run.board.set_stage.remote("iteration 0"))
    run.wait_for("iteration 0")  # while the stage runs, before any learner reports
    run.step("policy 0", 1)
    run.wait_for("1/4")
    time.sleep(1.0)  # several polls, nothing new: nothing printed again
    run.step("policy 0", 2)
    run.wait_for("2/4")
    ray.get(run.board.set_stage.remote("merging"))
    run.wait_for("merging")
    text = run.end()
    assert text.count("iteration 0") == 1 and text.count("merging") == 1
    assert text.index("iteration 0") < text.index("1/4") < text.index("2/4") < text.index("merging")
    assert rows(text, "policy 0") == ["1/4", "2/4"]
    assert text.count("KL to anchor") == 2  # a table per move, none again at the stage's end


@pytest.mark.parametrize("dumb_terminal", [False, True])
def test_without_a_terminal_a_stage_shorter_than_the_interval_prints_its_learners_last_rows_at_its_end(
    logged_run, dumb_terminal, monkeypatch
):
    monkeypatch.setenv("TERM", "dumb" if dumb_terminal else "xterm")
    run = logged_run(every_s=3600, dumb_terminal=dumb_terminal)
    assert run.console.is_dumb_terminal == dumb_terminal
    ray.get(run.board.set_stage.remote("iteration 0"))
    run.step("policy 0", 1)
    run.step("policy 0", 3)
    run.step("policy 1", 4)
    run.wait_for("iteration 0")
    time.sleep(1.5)  # several polls: the learners' lines are not due yet
    assert "policy 0" not in run.text()
    ray.get(run.board.set_stage.remote("iteration 1"))
    run.step("policy 0", 2)
    text = run.end()
    # each stage's last rows, once: iteration 0's as iteration 1 begins, iteration 1's at the run's end
    assert rows(text, "policy 0") == ["3/4", "2/4"] and rows(text, "policy 1") == ["4/4"]
    assert text.index("3/4") < text.index("iteration 1") < text.index("2/4")
