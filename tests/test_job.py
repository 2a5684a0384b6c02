"""`ray job submit` of jobs/warp.py, as users launch it, to a `ray start --head` cluster that
listens on loopback with token authentication on."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """A head node of its own (its own process group, so stopping it leaves other clusters alone)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's Unix socket paths must fit in 107 bytes
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # Every port of its own: the test session's cluster already holds Ray's default agent ports.
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
        )
    ]
    process = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            *ports,
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while subprocess.run(["ray", "job", "list", "--address", url], env=env, capture_output=True).returncode:
        assert time.time() < deadline and process.poll() is None, "the head node did not come up"
        time.sleep(2)
    yield url, env
    # A throwaway cluster: no graceful stop (which took 30 s), every process of its session killed.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_warp_on_a_token_authenticated_loopback_cluster(head, tiny_task, tmp_path):
    url, env = head
    denied = subprocess.run(
        ["ray", "job", "list", "--address", url],
        env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
        capture_output=True,
        text=True,
    )
    assert denied.returncode != 0  # the cluster turns away a wrong token

    out = tmp_path / "run"
    shutil.copytree(tiny_task, out / "task")  # the test session's task, reused by its parameters
    built = (out / "task" / "task.json").stat().st_mtime_ns
    # every parameter it was built with (configs/tiny.yaml's differ), so that the job reuses it
    params = json.loads((out / "task" / "task.json").read_text())["params"]
    task = [f"task.{k}={json.dumps(v)}" for k, v in params.items() if k not in ("max_new_tokens", "world")]
    overrides = [
        f"paths.output_dir={out}",
        "warp.proxy_reward=gold",
        "warp.M=1",
        "warp.I=1",
        "warp.T=2",
        "evaluation.prompts=4",
        "evaluation.samples_per_prompt=1",
        "evaluation.front_etas=[0.0,1.0]",
        f"warp.max_new_tokens={params['max_new_tokens']}",
        *task,
    ]
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/warp.py",
        "--config",
        "configs/tiny.yaml",
        *[a for o in overrides for a in ("--set", o)],
    ]
    for _ in range(30):  # the head's job agent can come up a little after its dashboard
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout and "final policy" in submit.stdout
    assert (out / "iteration_0" / "model" / "model.safetensors").is_file() and (
        out / "iteration_0" / "front.png"
    ).is_file()
    assert (out / "task" / "task.json").stat().st_mtime_ns == built  # reused, not built again
