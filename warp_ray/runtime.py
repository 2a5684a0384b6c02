"""Joining or starting Ray.

Inside a Ray job (`ray job submit`), or with RAY_ADDRESS set, warp-ray joins that cluster.
Otherwise it starts a local one whose services listen on loopback only: nothing is
exposed beyond this machine unless the user points warp-ray at a cluster.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

import ray
import ray.exceptions
from ray._private import ray_constants

if TYPE_CHECKING:
    import torch

SERVICE = {"max_restarts": 3, "max_task_retries": -1}
"""Ray options of a stateless service actor (the reward server, the reference policy): if its
process dies, Ray starts it again, up to 3 times, and retries the calls in flight, which give
the same answers on the new process; the callers see a delay, not an error."""


class InProcess:
    """An object of this process called as an actor is, `handle.method.remote(*args)`, so that code
    written for actor handles drives it unchanged: the call runs at once (an error is raised there),
    the ObjectRefs among its arguments resolved as Ray resolves them, its result put in the object
    store. A learner actor hosts its colocated rank this way (warp_ray/learner/learner.py)."""

    def __init__(self, target: object):
        self.target = target
        self.raised: Optional[BaseException] = None  # what the last call raised: the target's error, not the caller's

    def __getattr__(self, name: str) -> "_InProcessMethod":
        if name.startswith("__"):  # copy and pickle protocols: not the target's methods
            raise AttributeError(name)
        return _InProcessMethod(self, getattr(self.target, name))

    def __reduce__(self):
        raise TypeError(f"{type(self.target).__name__} runs in this process: its handle cannot leave it")


class _InProcessMethod:
    def __init__(self, handle: InProcess, method):
        self.handle, self.method = handle, method

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        def resolved(value):
            return ray.get(value) if isinstance(value, ray.ObjectRef) else value

        args, kwargs = [resolved(a) for a in args], {k: resolved(v) for k, v in kwargs.items()}
        self.handle.raised = None
        try:
            result = self.method(*args, **kwargs)
        except BaseException as error:
            self.handle.raised = error
            raise
        return ray.put(result)


def log_if_restarted(service: str) -> None:
    """Called in a service actor's constructor: say in the logs that its process died and was replaced."""
    with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated property inside this one
        warnings.simplefilter("ignore", DeprecationWarning)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
    if restarted:
        logging.getLogger(__name__).warning(
            "%s restarted after its process died; the calls in flight are retried", service
        )


def gpu_options(gpus: float) -> dict:
    """Ray options of an actor given `gpus` GPUs. None named when it has none: an actor that names
    any resource holds a CPU for as long as it lives, one that names none holds no CPU while it runs."""
    return {"num_gpus": gpus} if gpus > 0 else {}


def remote_cause(error: BaseException) -> BaseException:
    """The error raised in an actor, without Ray's wrapping and remote traceback."""
    return error.cause if isinstance(error, ray.exceptions.RayTaskError) else error


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")
"""The line of a traceback that names the error raised: "ValueError: ..." or "pydantic_core....ValidationError: ..."."""


def remote_message(error: BaseException) -> str:
    """What an actor raised, in one line: a method's error as raised; for an actor whose constructor
    raised, Ray gives only a traceback's text, and the error is its last exception line on."""
    cause = str(remote_cause(error)).strip()
    if isinstance(error, ray.exceptions.RayActorError):
        lines = cause.splitlines()
        last = max((i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)), default=len(lines) - 1)
        cause = " ".join(line.strip() for line in lines[last:] if not line.startswith("For further information"))
    return cause


def actor_device(gpus: float, what: str) -> torch.device:
    """The device of an actor that Ray gave `gpus` GPUs: the first it sees (Ray sets
    CUDA_VISIBLE_DEVICES), or the CPU when it was given none. A GPU given but invisible to torch
    (a driver too old for torch's CUDA) fails here, loudly, instead of running on the CPU."""
    import torch  # here: a process that holds no tensors (a function's reward server) imports no torch

    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} was given {gpus} GPU(s) but torch {torch.__version__} sees none: check that the NVIDIA "
            f"driver supports CUDA {torch.version.cuda} (docs/gpu.md#driver-and-cuda)"
        )
    return torch.device("cuda", torch.cuda.current_device())


def environment_ninja_first() -> None:
    """Put the folder of this environment's ninja (the `ninja` package, which DeepSpeed installs) first on
    the PATH, before DeepSpeed loads an op. DeepSpeed compiles its ops at their first use (on the CPU, its
    shared-memory op for collectives: 25 s on 2 cores), and even for an op already built it asks the first
    `ninja` on the PATH: without one, it refuses to load the op; a system ninja of another version reads the
    environment's build log as stale and builds the op again, and the environment's ninja does the same
    next. A Ray worker has its PATH from whoever started Ray, activated or not."""
    try:
        from ninja import BIN_DIR
    except ImportError:  # no ninja of its own: the PATH's decides
        return
    if not BIN_DIR or not os.path.isfile(os.path.join(BIN_DIR, "ninja")):  # its binary not found: "" is the cwd
        return
    path = os.environ.get("PATH", os.defpath)
    if path.split(os.pathsep)[0] != BIN_DIR:
        os.environ["PATH"] = os.pathsep.join([BIN_DIR, path])


TCMALLOC = "libtcmalloc_minimal.so.4"
"""gperftools' allocator (the Debian and Ubuntu package libtcmalloc-minimal4), which vLLM's CPU backend asks to be
preloaded: on these machines torch's many small allocations made with it take less time to sample with vLLM or
`generate` and to run an update (docs/benchmarks.md). A name without a folder: the dynamic loader finds it."""
ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")
"""Allocators a user may preload already: the first library preloaded serves malloc, so theirs stays."""


def preloaded_libraries(value: str) -> list[str]:
    """The libraries an LD_PRELOAD value names: the dynamic loader splits it at colons and spaces."""
    return [name for name in value.replace(" ", ":").split(":") if name]


def worker_environment(environment: Mapping[str, str], library: Optional[str]) -> dict[str, str]:
    """The variables a local CPU cluster's workers get: `library` (tcmalloc, found on this machine, or None) preloaded
    before what `environment` preloads already; nothing where that is an allocator, or `library` was not found."""
    preloaded = preloaded_libraries(environment.get("LD_PRELOAD", ""))
    if library is None or any(os.path.basename(name).startswith(ALLOCATORS) for name in preloaded):
        return {}
    return {"LD_PRELOAD": ":".join([library, *preloaded])}


def nvidia_gpu_here() -> bool:
    """Whether this machine's NVIDIA driver lists a GPU, checked without CUDA (this process may yet fork)."""
    return any(Path("/proc/driver/nvidia/gpus").glob("*"))


def found_tcmalloc() -> Optional[str]:
    """TCMALLOC where the dynamic loader finds it and the machine has no NVIDIA GPU (a GPU run leaves the allocator
    to its image); else None."""
    import ctypes.util

    if nvidia_gpu_here() or ctypes.util.find_library("tcmalloc_minimal") != TCMALLOC:
        return None
    return TCMALLOC


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster of RAY_ADDRESS (or of the Ray job), or start a local one on loopback, whose
    workers preload tcmalloc on a CPU machine that has it (`worker_environment`); a cluster joined
    has its workers' environment from whoever started it. log_to_driver False: the workers' output
    stays in their log files, off this console."""
    if ray.is_initialized():
        return
    console = {"log_to_driver": log_to_driver, "logging_level": logging.INFO if log_to_driver else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**console)
        return
    # Ray otherwise takes this machine's network address and binds its services to every
    # interface. This flag (what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets, read once at import)
    # makes it use loopback, as it does on a laptop; tests/test_runtime.py checks the sockets.
    ray_constants.ENABLE_RAY_CLUSTER = False
    library = found_tcmalloc()
    if library is None:
        logging.getLogger(__name__).info(
            "the cluster's workers keep their allocator: an NVIDIA GPU is here, or no %s is installed", TCMALLOC
        )
    # "local" rather than the default: a stale ray_current_cluster file would make a plain
    # ray.init() try to join a cluster stopped earlier. The preload goes through Ray's own processes,
    # which pass an LD_PRELOAD they were started with on to the workers they start (one they set
    # themselves, their bundled jemalloc, they keep from the workers; with tcmalloc set they use it
    # instead): a job's runtime_env would cost every worker's start 0.3 s more here, and this process's
    # later subprocesses keep its environment.
    with environment_while(worker_environment(os.environ, library)):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **console,
        )


@contextmanager
def environment_while(variables: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with `variables` set, for what it starts meanwhile; as it was afterwards."""
    before = {name: os.environ.get(name) for name in variables}
    try:
        os.environ.update(variables)
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def link_worker_logs(link: Path) -> None:
    """Make `link` point at this node's folder of the Ray session's logs: every worker's stdout and
    stderr (vLLM's, DeepSpeed's, the learners'), one file pair per process. On a multi-node cluster
    the other nodes keep theirs; `ray logs` reads them from anywhere."""
    node = ray._private.worker._global_node  # no public API gives this folder
    if node is None:  # a Ray Client driver: no node here
        logging.getLogger(__name__).warning("no Ray node on this machine: read the workers' logs with `ray logs`")
        return
    logs = Path(node.get_logs_dir_path())
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(logs, target_is_directory=True)
