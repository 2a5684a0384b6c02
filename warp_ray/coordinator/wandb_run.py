"""The run on Weights & Biases (`logging.wandb`), kept by the coordinator: the config at the start,
then, as each iteration ends, every learner step's metrics (as `policy_<m>/<metric>`, at the run's
global step), the LITI front as a table and its plot. TensorBoard and metrics.jsonl get the same
metrics as each step ends; W&B gets them once the iteration's policies are in. A resumed run is a
new W&B run, which goes on from the global step of the iteration it resumes at."""

from __future__ import annotations

from numbers import Number
from pathlib import Path
from typing import Sequence

from warp_ray.config import WarpConfig


class WandbRun:
    def __init__(self, config: WarpConfig):
        import wandb

        params = config.logging.wandb
        self.wandb = wandb
        self.steps_per_iteration = config.warp.T
        self.run = wandb.init(
            project=params.project,
            entity=params.entity,
            mode=params.mode,
            name=params.name,
            dir=str(config.paths.output_dir),
            config=config.model_dump(mode="json"),
        )

    def log_iteration(
        self, i: int, policies: Sequence[int], trajectories: Sequence[Sequence[dict]], front: Sequence[dict], plot: Path
    ) -> None:
        """policies: the learners whose trajectories these are (`logs/iteration_<i>/policy_<m>`)."""
        first = i * self.steps_per_iteration
        for s, rows in enumerate(zip(*trajectories), start=1):
            metrics = {
                f"policy_{m}/{key}": value
                for m, row in zip(policies, rows)
                for key, value in row.items()
                if key != "step" and isinstance(value, Number)
            }
            self.run.log({**metrics, "iteration": i}, step=first + s)
        columns = sorted({key for point in front for key, value in point.items() if not isinstance(value, list)})
        table = self.wandb.Table(columns=columns, data=[[point.get(key) for key in columns] for point in front])
        image = self.wandb.Image(str(plot), caption=f"WARP iteration {i}")
        # the iteration's last step, committed: W&B otherwise holds a step's row until a later step
        self.run.log({"front": table, "front_plot": image}, step=first + self.steps_per_iteration, commit=True)

    def finish(self, failed: bool = False) -> None:
        """End the run and wait for W&B's service process to have written (or sent) everything: Ray
        ends an actor's child processes with it, and a service still writing would lose the rest."""
        self.run.finish(exit_code=1 if failed else 0)
        self.wandb.teardown()
