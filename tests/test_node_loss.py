"""A learner's node lost mid-iteration, for real: a multi-node Ray cluster on this machine (each
node its own raylet, `ray.cluster_utils.Cluster`), a node's processes killed while its learner
trains. With a spare node, the learner's placement group is placed again there and the learner
rerun; without one, the group gives up after `learners.place_timeout_s` and merges the survivors.

The learners here are stand-ins that hold their bundle as a real learner's ranks do (a real one
starts vLLM engines, a minute each on these 2 cores): what is tested is how the group reacts.
The scenario runs in a process of its own, since this test session's driver is already
connected to another cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def scenario() -> None:
    import ray
    import torch
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from warp_ray.config import WarpConfig
    from warp_ray.coordinator.learners import LearnerGroup

    @ray.remote(num_cpus=0)
    class Rank:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    class StandInLearner:
        """Holds its bundle with a rank, trains by waiting for a file, returns a one-tensor policy."""

        def __init__(self, m, group):
            self.m, self.rank = (
                m,
                Rank.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote(),
            )

        def set_weights(self, init, seed):
            self.seed = seed

        def run(self, steps, log_dir, desc, progress=None):
            node = ray.get(self.rank.node.remote())
            (log_dir.parent / f"node_{self.m}").parent.mkdir(parents=True, exist_ok=True)
            (log_dir.parent / f"node_{self.m}").write_text(node)
            while not (log_dir.parent / "go").exists():
                time.sleep(0.1)
            return [{"step": steps, "node": node}]

        def put_weights(self, layout):
            return [ray.put({"w": torch.full((1,), float(self.m))})]

    from pathlib import Path

    out = Path(sys.argv[1])
    ray_constants.ENABLE_RAY_CLUSTER = False  # as warp_ray.runtime.init_ray: every raylet on loopback
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    nodes = [
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(3)
    ]  # a learner each (rank + engine)
    cluster.connect()
    config = WarpConfig.from_dict(
        {
            "warp": {"M": 2},
            "resources": {"learner_retries": 1, "cpus_per_rank": 1},
            "learners": {"min": 1, "place_timeout_s": 10},
        }
    )
    group = LearnerGroup(
        config,
        lambda m, g: StandInLearner.options(scheduling_strategy=PlacementGroupSchedulingStrategy(g)).remote(m, g),
        out,
    )
    assert group.scale() == 2  # two nodes of three used: one spare
    report = {}
    for iteration in (0, 1):  # lose a learner's node in each: first with a spare node, then without
        folder = out / f"iteration_{iteration}"
        folder.mkdir(parents=True)
        import threading

        def lose_node_of_learner_1(folder=folder):
            while not (folder / "node_1").exists():
                time.sleep(0.1)
            node_id = (folder / "node_1").read_text()
            (folder / "node_1").unlink()
            cluster.remove_node(next(n for n in nodes if n.node_id == node_id))
            nodes[:] = [n for n in nodes if n.node_id != node_id]
            (folder / "go").touch()

        killer = threading.Thread(target=lose_node_of_learner_1)
        killer.start()
        policies, histories = group.train([], iteration, [["w"]])
        killer.join()
        report[iteration] = {
            "policies": [ray.get(p[0])["w"].item() for p in policies],
            "nodes": [h[0]["node"] for h in histories],
        }
    report["restarts"] = group.restarts
    group.close()
    print("REPORT " + json.dumps(report))


def test_a_lost_node_is_replaced_by_a_spare_then_given_up_on_after_the_timeout(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", "from tests.test_node_loss import scenario; scenario()", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(lines[0].removeprefix("REPORT "))
    # Iteration 0: learner 1's node lost, its group placed again on the spare node, the learner rerun there.
    assert report["0"]["policies"] == [0.0, 1.0]
    assert len(set(report["0"]["nodes"])) == 2
    # Iteration 1: learner 1's node lost again, no node left for it: dropped, learner 0 merged alone.
    assert report["1"]["policies"] == [0.0]
    assert report["restarts"] == [
        {"iteration": 0, "policy": 1, "error": report["restarts"][0]["error"], "rerun": True},
        {"iteration": 1, "policy": 1, "error": report["restarts"][1]["error"], "rerun": False},
    ]
