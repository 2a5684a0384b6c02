"""User data: JSONL and `datasets` folders, and a clear message for every malformed input."""

from __future__ import annotations

import pytest

from warp_ray.data import DataError, preference_splits, read_preferences, read_prompts


def test_jsonl_prompts_and_preferences(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "train.jsonl").write_text('{"prompt": "x", "chosen": "good", "rejected": "bad"}\n')
    assert read_preferences(tmp_path / "train.jsonl")[0]["chosen"] == "good"
    assert preference_splits(tmp_path) == {"train": tmp_path / "train.jsonl"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a"}\n{"prompt": "b"\n', r"p.jsonl:2: not valid JSON"),
        (b'{"prompt": "a"}\n["prompt"]\n', r"p.jsonl:2: expected a JSON object with keys prompt, got list"),
        (b'{"prompt": 3}\n', r"p.jsonl:1: key 'prompt' must be a string \(a int\)"),
        (b'{"text": "a"}\n', r"p.jsonl:1: key 'prompt' must be a string \(missing\)"),
        (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"p.jsonl:2: not UTF-8"),
        (b"\n\n", r"p.jsonl has no records"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_prompts(tmp_path / "p.jsonl")


def test_missing_file_and_missing_train_split(tmp_path):
    with pytest.raises(DataError, match="cannot read .*nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="has no train.jsonl"):
        preference_splits(tmp_path)


def test_datasets_folders(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "x", "chosen": "c", "rejected": "r"}]).save_to_disk(str(tmp_path / "train"))
    assert preference_splits(tmp_path) == {"train": tmp_path / "train"}
    assert read_preferences(tmp_path / "train") == [{"prompt": "x", "chosen": "c", "rejected": "r"}]
    Dataset.from_list([{"prompt": "x", "answer": "c"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"lacks column\(s\) chosen, rejected"):
        read_preferences(tmp_path / "bad")
