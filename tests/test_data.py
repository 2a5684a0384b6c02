"""User data: JSONL, Parquet and `datasets` folders, text or chat messages, columns of any name,
and a clear message for every malformed input."""

from __future__ import annotations

import json

import pyarrow
import pyarrow.parquet
import pytest

from warp_ray.config import DataColumns
from warp_ray.data import DataError, preference_splits, prompt_splits, read_preferences, read_prompts

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
REPLY = [{"role": "assistant", "content": "hi"}]


def test_jsonl_prompts_and_preferences(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "train.jsonl").write_text('{"prompt": "x", "chosen": "good", "rejected": "bad", "id": 7}\n')
    assert read_preferences(tmp_path / "train.jsonl") == [{"prompt": "x", "chosen": "good", "rejected": "bad", "id": 7}]
    assert preference_splits(tmp_path) == {"train": tmp_path / "train.jsonl"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a"}\n{"prompt": "b"\n', r"p.jsonl:2: not valid JSON"),
        (b'{"prompt": "a"}\n["prompt"]\n', r"p.jsonl:2: expected a JSON object with keys prompt, got list"),
        (b'{"prompt": 3}\n', r"p.jsonl:1: key 'prompt': expected a string or a non-empty list of messages, got a int"),
        (b'{"text": "a"}\n', r"p.jsonl:1: key 'prompt' is missing \(it has 'text'\)"),
        (b'{"prompt": []}\n', r"p.jsonl:1: key 'prompt': .* got an empty list"),
        (b'{"prompt": [{"role": "user"}]}\n', r"p.jsonl:1: key 'prompt': message 0 must be an object with string"),
        (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"p.jsonl:2: not UTF-8"),
        (b"\n\n", r"p.jsonl has no records"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_prompts(tmp_path / "p.jsonl")


def test_missing_file_and_missing_splits(tmp_path):
    with pytest.raises(DataError, match="cannot read .*nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="has no train.jsonl"):
        preference_splits(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"has no held_out.jsonl \(nor held_out.parquet"):
        prompt_splits(tmp_path)


def test_chat_messages_as_prompts_and_as_completions(tmp_path):
    pairs = [
        {"prompt": CHAT, "chosen": REPLY, "rejected": "text reply"},
        {"prompt": "x", "chosen": "a", "rejected": "b"},
    ]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT}, {"prompt": "text"}])
    assert read_prompts(tmp_path / "p.jsonl") == [CHAT, "text"]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert read_preferences(tmp_path / "pairs.jsonl") == pairs
    write_jsonl(tmp_path / "bad.jsonl", [*pairs, {"prompt": "x", "chosen": REPLY, "rejected": "b"}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: key 'chosen': messages need a prompt of messages too"):
        read_preferences(tmp_path / "bad.jsonl")


def test_columns_of_any_name_come_back_under_the_usual_names(tmp_path):
    columns = DataColumns(prompt_key="question", chosen_key="better", rejected_key="worse")
    write_jsonl(tmp_path / "train.jsonl", [{"question": CHAT, "better": "yes", "worse": "no", "prompt": "ignored"}])
    assert read_preferences(tmp_path / "train.jsonl", columns) == [{"prompt": CHAT, "chosen": "yes", "rejected": "no"}]
    assert read_prompts(tmp_path / "train.jsonl", columns) == [CHAT]
    with pytest.raises(DataError, match=r"train.jsonl:1: key 'better ' is missing \(it has 'question', 'better'"):
        read_preferences(tmp_path / "train.jsonl", DataColumns(prompt_key="question", chosen_key="better "))


def test_parquet_files(tmp_path):
    rows = [{"q": CHAT, "a": REPLY, "b": REPLY}, {"q": CHAT, "a": "plain", "b": REPLY}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[:1]), tmp_path / "train.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"q": "x"}, {"q": "y"}]), tmp_path / "held_out.parquet")
    assert prompt_splits(tmp_path) == {"train": tmp_path / "train.parquet", "held_out": tmp_path / "held_out.parquet"}
    columns = DataColumns(prompt_key="q", chosen_key="a", rejected_key="b")
    assert read_preferences(tmp_path / "train.parquet", columns) == [
        {"prompt": CHAT, "chosen": REPLY, "rejected": REPLY}
    ]
    assert read_prompts(tmp_path / "held_out.parquet", columns) == ["x", "y"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet is not a readable Parquet file"):
        read_prompts(tmp_path / "broken.parquet", columns)


def test_datasets_folders(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "x", "chosen": "c", "rejected": "r"}]).save_to_disk(str(tmp_path / "train"))
    assert preference_splits(tmp_path) == {"train": tmp_path / "train"}
    assert read_preferences(tmp_path / "train") == [{"prompt": "x", "chosen": "c", "rejected": "r"}]
    Dataset.from_list([{"prompt": "x", "answer": "c"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 0: key 'chosen' is missing \(it has 'prompt', 'answer'\)"):
        read_preferences(tmp_path / "bad")


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_three_columns_must_differ():
    with pytest.raises(ValueError, match=r"must name 3 columns, got \['prompt', 'rejected', 'rejected'\]"):
        DataColumns(chosen_key="rejected")
