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

from warp_ray.runtime import (
    TCMALLOC,
    actor_device,
    environment_ninja_first,
    environment_while,
    found_tcmalloc,
    nvidia_gpu_here,
    worker_environment,
)

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


def test_workers_preload_tcmalloc_first_once_and_keep_what_was_preloaded():
    assert worker_environment({}, TCMALLOC) == {"LD_PRELOAD": TCMALLOC}
    assert worker_environment({"LD_PRELOAD": "/opt/a.so b.so"}, TCMALLOC) == {
        "LD_PRELOAD": f"{TCMALLOC}:/opt/a.so:b.so"
    }
    for already in (TCMALLOC, f"/usr/lib/x86_64-linux-gnu/{TCMALLOC}.5.10", f"a.so:{TCMALLOC}", "libtcmalloc.so.4"):
        assert worker_environment({"LD_PRELOAD": already}, TCMALLOC) == {}, already
    for theirs in ("/usr/lib/libjemalloc.so.2", "a.so libmimalloc.so"):  # the user's allocator serves malloc
        assert worker_environment({"LD_PRELOAD": theirs}, TCMALLOC) == {}, theirs
    assert worker_environment({"LD_PRELOAD": "a.so"}, None) == {}  # not installed, or a GPU seen


def test_an_environment_set_for_a_while_is_restored_as_it_was(monkeypatch):
    monkeypatch.setenv("KEPT", "before")
    monkeypatch.delenv("ADDED", raising=False)
    with environment_while({"KEPT": "during", "ADDED": "during"}):
        assert os.environ["KEPT"] == os.environ["ADDED"] == "during"
    assert os.environ["KEPT"] == "before" and "ADDED" not in os.environ
    with pytest.raises(KeyError), environment_while({"ADDED": "during"}):
        raise KeyError("raised inside")
    assert "ADDED" not in os.environ


ALLOCATOR_PROBE = """
import json, os, ray, subprocess
from warp_ray.runtime import TCMALLOC, init_ray
before = os.environ.get("LD_PRELOAD")
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def mapped():
    child = subprocess.run(["cat", "/proc/self/maps"], capture_output=True, text=True, check=True).stdout
    return [TCMALLOC in open("/proc/self/maps").read(), TCMALLOC in child]

print(json.dumps({"before": before, "after": os.environ.get("LD_PRELOAD"), "mapped": ray.get(mapped.remote())}))
"""


def test_a_local_clusters_workers_and_their_children_run_on_tcmalloc_and_the_driver_keeps_its_environment():
    """`make setup` installs tcmalloc where it may (Debian's libtcmalloc-minimal4); a CPU machine's workers
    then map it, as do the processes they start (a vLLM engine's core, a compiler). In a fresh process, as
    a run's driver starts its cluster."""
    if nvidia_gpu_here():
        pytest.skip(reason="an NVIDIA GPU here: a GPU run leaves the allocator to its image")
    if found_tcmalloc() is None:
        if os.environ.get("CI"):
            pytest.fail(f"no {TCMALLOC} here: `make setup` installs it as root (libtcmalloc-minimal4)")
        pytest.skip(reason=f"no {TCMALLOC} here: `make setup` installs it as root (libtcmalloc-minimal4)")
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["mapped"] == [True, True], seen
    assert seen["before"] is None and seen["after"] is None  # the driver's own subprocesses: as before
