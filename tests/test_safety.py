"""Safe defaults, checked over the source that users run (warp_ray/, jobs/): weights are never
unpickled, remote code runs only when paths.trust_remote_code says so, and only
warp_ray.runtime starts or joins Ray (on loopback unless RAY_ADDRESS names a cluster:
tests/test_runtime.py). Secrets in the environment never reach a run's files:
tests/test_coordinator.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "warp_ray").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


def calls(name: str):
    """(file, call) for every call of `<anything>.name(...)` or `name(...)` in the sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if called == name:
                    yield path.relative_to(ROOT), node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_scan_sees_the_calls_it_checks():
    assert len(list(calls("from_pretrained"))) >= 8 and len(list(calls("LLM"))) == 1 and len(list(calls("init"))) >= 1


def test_weights_are_never_unpickled():
    """No torch.load (nor pickle) at all: every weight is read from safetensors (warp_ray/checkpoint.py),
    so not even torch.load(weights_only=True) is needed."""
    unpickling = [
        (str(p), c.lineno)
        for name in ("load", "loads")
        for p, c in calls(name)
        if ast.unparse(c.func) in ("torch.load", "pickle.load", "pickle.loads")
    ]
    assert unpickling == []


@pytest.mark.parametrize("name", ["from_pretrained", "LLM"])
def test_remote_code_is_only_trusted_through_the_config(name):
    """Every Auto* load and vLLM engine passes trust_remote_code, never a literal True: it is the
    config's paths.trust_remote_code (False by default) on its way down."""
    for path, call in calls(name):
        if name == "from_pretrained" and not ast.unparse(call.func).startswith("Auto"):
            continue  # a concrete class (GPT2LMHeadModel) runs no code from the folder
        trust = keyword(call, "trust_remote_code")
        assert trust is not None, f"{path}:{call.lineno} loads without passing trust_remote_code"
        assert not (isinstance(trust, ast.Constant) and trust.value is True), (
            f"{path}:{call.lineno} trusts remote code unconditionally"
        )


def test_only_the_runtime_module_starts_or_joins_ray():
    inits = {str(path) for path, call in calls("init") if ast.unparse(call.func) == "ray.init"}
    assert inits == {"warp_ray/runtime.py"}


def test_trust_remote_code_is_off_by_default():
    from warp_ray.config import WarpConfig

    assert WarpConfig().paths.trust_remote_code is False
