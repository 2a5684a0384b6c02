"""Prompts and preference pairs from JSONL files or `datasets` folders, with clear errors.

    prompts      JSONL lines {"prompt": "..."}
    preferences  JSONL lines {"prompt": "...", "chosen": "...", "rejected": "..."}
                 (the built-in task adds "flipped", "gold_chosen" and "gold_rejected")

or a folder written by `datasets.Dataset.save_to_disk` with the same columns. A malformed
line is reported with its file and line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from warp_ray.errors import WarpRayError

PROMPT_KEYS = ("prompt",)
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


class DataError(WarpRayError):
    """A data file that is missing, empty, not UTF-8, or has a malformed record."""


def _check(record: object, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(keys)}, got {type(record).__name__}")
    for key in keys:
        if not isinstance(record.get(key), str):
            got = "missing" if key not in record else f"a {type(record[key]).__name__}"
            raise DataError(f"{where}: key {key!r} must be a string ({got})")
    return record


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}: column {e.colno})") from None
        records.append(_check(record, keys, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _read_dataset(path: Path, keys: tuple[str, ...]) -> list[dict]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a `datasets` folder saved with save_to_disk ({e})") from None
    missing = [k for k in keys if k not in dataset.column_names]
    if missing:
        raise DataError(
            f"{path}: the dataset lacks column(s) {', '.join(missing)} (it has {', '.join(dataset.column_names)})"
        )
    records = [_check(row, keys, f"{path} row {i}") for i, row in enumerate(dataset)]
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _read(path: str | Path, keys: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    return _read_dataset(path, keys) if path.is_dir() else _read_jsonl(path, keys)


def read_prompts(path: str | Path) -> list[str]:
    return [r["prompt"] for r in _read(path, PROMPT_KEYS)]


def read_preferences(path: str | Path) -> list[dict]:
    return _read(path, PREFERENCE_KEYS)


SPLITS = ("train", "validation", "ood")


def preference_splits(folder: str | Path) -> dict[str, Path]:
    """The splits of a preference folder: train (required), validation and ood (optional)."""
    folder = Path(folder)
    found = {}
    for name in SPLITS:
        for candidate in (folder / f"{name}.jsonl", folder / name):
            if candidate.exists():
                found[name] = candidate
                break
    if "train" not in found:
        raise DataError(f"{folder} has no train.jsonl (nor a `datasets` folder named train)")
    return found
