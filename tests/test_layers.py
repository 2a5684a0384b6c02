"""The package's layers, read from its source: imports point downwards, the maths knows nothing of
Ray, the config does no I/O, and the reward server knows nothing of the built-in task."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "warp_ray"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def role(module: str) -> str:
    """warp_ray.coordinator.learners -> coordinator; warp_ray.config -> config."""
    return module.split(".")[1]


def role_graph() -> dict[str, set[str]]:
    roles = {p.stem if p.parent == PACKAGE else p.parent.name for p in PACKAGE.rglob("*.py")} - {"__init__"}
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = path.stem if path.parent == PACKAGE else path.parent.name
        for module in imports(path):
            if module.startswith("warp_ray.") and role(module) in roles and role(module) != source:
                graph[source].add(role(module))
    return graph


LAYERS = [
    {"errors"},
    {"config", "chat", "checkpoint", "logprobs", "progress", "replicas", "runtime", "timing"},
    {"data", "memory", "merge", "shards", "task"},
    {"config_io", "reward", "rollout"},
    {"evaluation"},
    {"learner"},
    {"coordinator"},
    {"soups"},
    {"driver"},
    {"reproduce"},
    {"cli"},
]
"""warp-ray's roles, bottom up: a role imports only from the layers below its own."""


def test_every_import_points_down_the_layers():
    layer = {role: k for k, roles in enumerate(LAYERS) for role in roles}
    graph = role_graph()
    assert set(graph) | {r for targets in graph.values() for r in targets} <= set(layer), "a role with no layer"
    assert graph["coordinator"] >= {"learner", "reward"}  # the graph was read
    wrong = {(a, b) for a, targets in graph.items() for b in targets if layer[b] >= layer[a]}
    assert not wrong, f"imports that point up or across the layers: {sorted(wrong)}"


def test_the_maths_and_the_config_stay_at_the_bottom():
    for path in [
        *(PACKAGE / "merge").glob("*.py"),
        *(PACKAGE / "learner" / f for f in ("reinforce.py", "policy_update.py")),
        PACKAGE / "logprobs.py",
    ]:
        assert not any(m == "ray" or m.startswith("ray.") for m in imports(path)), f"{path.name} imports Ray"
    config = imports(PACKAGE / "config.py")
    assert {m for m in config if m.startswith("warp_ray")} <= {"warp_ray.errors", "warp_ray.errors.ConfigError"}
    assert not config & {"json", "os", "shutil", "safetensors", "warp_ray.checkpoint", "warp_ray.data"}
    source = (PACKAGE / "config.py").read_text()
    assert not any(call in source for call in ("open(", "read_text", "read_bytes", "write_")), "config.py does I/O"


def test_the_reward_server_knows_nothing_of_the_built_in_task():
    for path in (PACKAGE / "reward").glob("*.py"):
        assert not any(m.startswith("warp_ray.task") for m in imports(path)), f"reward/{path.name} imports the task"
