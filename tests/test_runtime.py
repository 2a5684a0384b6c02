"""Safe defaults of the Ray cluster that warp-ray starts by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import ray
import torch

from warp_ray.runtime import actor_device, environment_ninja_first

# Run in a fresh process, so that the cluster holds Ray's own services and one worker only:
# the sockets listed are those of the driver's descendants (GCS, raylet, agents, workers).
PROBE = """
import ipaddress, json, psutil, ray
from warp_ray.runtime import init_ray
init_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())
listening = [(c.laddr.ip, c.laddr.port, p.name()) for p in psutil.Process().children(recursive=True)
             for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps(listening))
"""


def test_a_local_cluster_listens_on_loopback_only():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    listening = json.loads(result.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in listening}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own services were seen
    exposed = [entry for entry in listening if not entry[0].removeprefix("::ffff:").startswith("127.")]
    assert exposed == []


def test_an_actor_given_a_gpu_that_torch_cannot_see_fails_loudly_instead_of_running_on_the_cpu():
    assert actor_device(0, "the reward server") == torch.device("cpu")
    if torch.cuda.is_available():  # a GPU seen: the first one
        assert actor_device(1, "the reward server") == torch.device("cuda", torch.cuda.current_device())
        return
    with pytest.raises(RuntimeError, match=r"the reward server was given 1 GPU\(s\) but torch .* sees none: check"):
        actor_device(1, "the reward server")


def test_service_actors_without_a_gpu_hold_no_cpu_while_they_run(ray_cluster, tiny_task):
    """An actor that names a resource, even num_gpus=0, holds a CPU for as long as it lives: two such
    services would take both CPUs of the tests' cluster and leave no room for learners."""
    from warp_ray.config import RewardServerParams, WarpConfig
    from warp_ray.evaluation import start_reference
    from warp_ray.reward.server import RewardSource, start_reward_server
    from warp_ray.task import world

    before = ray.available_resources().get("CPU", 0)
    services = [
        start_reward_server(RewardSource(function=world.gold_reward), RewardServerParams()),
        start_reference(tiny_task / "sft", WarpConfig()),
    ]
    ray.get([s.__ray_ready__.remote() for s in services])
    deadline = time.monotonic() + 10  # the cluster's view of its resources follows with a delay
    while ray.available_resources().get("CPU", 0) < before and time.monotonic() < deadline:
        time.sleep(0.2)
    after = ray.available_resources().get("CPU", 0)
    for service in services:
        ray.kill(service)
    assert after >= before, f"{before} CPUs free before the services, {after} with them"


def test_the_environments_ninja_goes_first_on_the_path_once_and_only_where_it_is(tmp_path, monkeypatch):
    import ninja

    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "ninja").write_text("")
    monkeypatch.setattr(ninja, "BIN_DIR", str(tools))
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    environment_ninja_first()
    environment_ninja_first()
    assert os.environ["PATH"] == f"{tools}:/usr/local/bin:/usr/bin"
    monkeypatch.delenv("PATH")
    environment_ninja_first()  # no PATH: the system's default search after it, as before
    assert os.environ["PATH"] == f"{tools}:{os.defpath}"
    monkeypatch.chdir(tools)  # "" would be the working directory, which here holds a ninja
    for missing in ("", str(tmp_path)):  # no binary found by the package, or not where it says: the PATH as it was
        monkeypatch.setattr(ninja, "BIN_DIR", missing)
        monkeypatch.setenv("PATH", "/usr/bin")
        environment_ninja_first()
        assert os.environ["PATH"] == "/usr/bin"
