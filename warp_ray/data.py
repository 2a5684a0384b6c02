"""Prompts and preference pairs from JSONL files, Parquet files or `datasets` folders, with clear errors.

    prompts      records {prompt_key: prompt}
    preferences  records {prompt_key: prompt, chosen_key: completion, rejected_key: completion}
                 (the built-in task adds "flipped", "gold_chosen" and "gold_rejected")

The column names are the config's data.*_key (`DataColumns`). A prompt is text or a list of chat
messages (warp_ray/chat.py); the completions of a message prompt may be text or the assistant's
messages. Records come back under the names "prompt", "chosen" and "rejected", with their other
columns as they are. A malformed record is reported with its file and line (or row) and key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from warp_ray.chat import Prompt, messages_problem
from warp_ray.config import DataColumns
from warp_ray.errors import WarpRayError

DEFAULT_COLUMNS = DataColumns()
PROMPT_SPLITS = ("train", "held_out")
PREFERENCE_SPLITS = ("train", "validation", "ood")


class DataError(WarpRayError):
    """A data file that is missing, empty, not UTF-8, or has a malformed record."""


def read_prompts(path: str | Path, columns: DataColumns = DEFAULT_COLUMNS) -> list[Prompt]:
    return [r["prompt"] for r in _read(path, {"prompt": columns.prompt_key})]


def read_preferences(path: str | Path, columns: DataColumns = DEFAULT_COLUMNS) -> list[dict]:
    keys = {"prompt": columns.prompt_key, "chosen": columns.chosen_key, "rejected": columns.rejected_key}
    return _read(path, keys)


def prompt_splits(folder: str | Path) -> dict[str, Path]:
    """The splits of a prompt folder: train and held_out, both required."""
    return _splits(folder, PROMPT_SPLITS, required=PROMPT_SPLITS)


def preference_splits(folder: str | Path) -> dict[str, Path]:
    """The splits of a preference folder: train (required), validation and ood (optional)."""
    return _splits(folder, PREFERENCE_SPLITS, required=("train",))


def _splits(folder: str | Path, names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Path]:
    folder = Path(folder)
    found = {}
    for name in names:
        for candidate in (folder / f"{name}.jsonl", folder / f"{name}.parquet", folder / name):
            if candidate.exists():
                found[name] = candidate
                break
    for name in required:
        if name not in found:
            raise DataError(f"{folder} has no {name}.jsonl (nor {name}.parquet, nor a `datasets` folder named {name})")
    return found


def _read(path: str | Path, keys: dict[str, str]) -> list[dict]:
    """The records of a file or folder, each checked, its `keys` columns renamed to their names."""
    path = Path(path)
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _jsonl_rows(path)
    records = [_record(row, keys, where) for where, row in rows]
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _record(row: object, keys: dict[str, str], where: str) -> dict:
    if not isinstance(row, dict):
        wanted = ", ".join(keys.values())
        raise DataError(f"{where}: expected a JSON object with keys {wanted}, got {type(row).__name__}")
    record = {k: v for k, v in row.items() if k not in keys.values()}
    for name, column in keys.items():
        if column not in row:
            raise DataError(f"{where}: key {column!r} is missing (it has {', '.join(map(repr, row)) or 'none'})")
        value = record[name] = row[column]
        if isinstance(value, str):
            continue
        problem = messages_problem(value)
        if problem is None and name != "prompt" and isinstance(record["prompt"], str):
            problem = f"messages need a prompt of messages too, and {keys['prompt']!r} is a string"
        if problem is not None:
            raise DataError(f"{where}: key {column!r}: {problem}")
    return record


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}: column {e.colno})") from None


def _parquet_rows(path: Path) -> Iterable[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    return ((f"{path} row {i}", row) for i, row in enumerate(rows))


def _dataset_rows(path: Path) -> Iterable[tuple[str, object]]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a `datasets` folder saved with save_to_disk ({e})") from None
    return ((f"{path} row {i}", row) for i, row in enumerate(dataset))
