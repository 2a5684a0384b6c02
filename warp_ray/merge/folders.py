"""The merges of `warp_ray.merge` on Hugging Face model folders, streamed chunk by chunk.

Memory stays near one block of rows per input model, whatever the model size: blocks are
sliced out of the safetensors files (each opened for one block only, so that the mapped
pages are released) and every merged chunk is written to the output at once.
The output keeps the first folder's shard layout, config and tokenizer files, so it
loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from warp_ray.checkpoint import (
    TensorInfo,
    architecture,
    atomic_dir,
    copy_non_weight_files,
    open_safetensors,
    weight_files,
    weight_layout,
    write_safetensors,
)
from warp_ray.errors import MergeError
from warp_ray.merge.linear import average_merge, liti_merge
from warp_ray.merge.slerp import slerp_merge
from warp_ray.merge.soup import simplex
from warp_ray.merge.state_dict import Merge, check_compatible
from warp_ray.merge.task_vectors import combine, row_spans

Folder = str | Path


BLOCK_ELEMENTS = 1 << 23
"""Elements read per file opening (32 MiB of float32): the kernels' chunks are sliced from it."""


class RowReader:
    """Rows of one tensor of one folder, read a block at a time from its safetensors file.

    The file is opened for one block only: closing it releases the mapped pages, so resident
    memory stays near one block per input instead of growing to the whole tensor.
    """

    def __init__(self, folder: Path, name: str, info: TensorInfo):
        self.path = folder / info.file
        self.name = name
        self.info = info
        self.rows_per_block = max(1, BLOCK_ELEMENTS // max(1, int(torch.Size(info.shape[1:]).numel())))
        self.start, self.block = 0, None

    def __call__(self, start: int, stop: int) -> Tensor:
        if self.block is None or not (self.start <= start and stop <= self.start + len(self.block)):
            self.start = start
            with open_safetensors(self.path) as f:
                self.block = (
                    f.get_tensor(self.name).reshape(1)
                    if not self.info.shape
                    else f.get_slice(self.name)[start : start + max(stop - start, self.rows_per_block)]
                )
        return self.block[start - self.start : stop - self.start]


def merge_folders(
    merge: Merge, folders: Sequence[Folder], out: Folder, overwrite: bool = False, progress: bool = True
) -> Path:
    """Run `merge` on model folders; folders[0] is the reference (dtype, layout, config, tokenizer)."""
    folders = [Path(f) for f in folders]
    for folder in folders[1:]:
        if architecture(folder) != architecture(folders[0]):
            raise MergeError(
                f"{folder} is a {architecture(folder)} model and {folders[0]} a {architecture(folders[0])}: "
                "a merge takes models of one architecture"
            )
    check_same_tokenizer(folders)
    layouts = [weight_layout(f) for f in folders]
    read_into = torch.device("cpu")  # each folder's tensors are read into this process's memory
    check_compatible(
        [{k: (i.shape, i.dtype, read_into) for k, i in lay.items()} for lay in layouts], [str(f) for f in folders]
    )
    reference = layouts[0]
    with open_safetensors(folders[0] / weight_files(folders[0])[0]) as f:
        metadata = {**(f.metadata() or {}), "format": "pt"}

    def chunks(name: str) -> Iterator[Tensor]:
        bar.update()
        readers = [RowReader(f, name, lay[name]) for f, lay in zip(folders, layouts)]
        read = lambda start, stop: [reader(start, stop) for reader in readers]  # noqa: E731
        spans = row_spans(reference[name].shape)
        if not reference[name].dtype.is_floating_point:
            return (read(start, stop)[0] for start, stop in spans)
        return combine(read, spans, merge(read, spans))

    by_file = groupby(sorted(reference, key=lambda n: reference[n].file), key=lambda n: reference[n].file)
    with (
        atomic_dir(out, overwrite) as tmp,
        tqdm(total=len(reference), unit="tensor", desc=f"merge -> {out}", disable=not progress) as bar,
    ):
        copy_non_weight_files(folders[0], tmp)
        for file, names in by_file:
            write_safetensors(tmp / file, {n: reference[n] for n in names}, chunks, metadata)
    return Path(out)


def check_same_tokenizer(folders: Sequence[Path], why: str = "a merge takes models of one tokenizer") -> None:
    """Token i must be the same token in every model merged: averaged over different vocabularies,
    an embedding row is noise (and the KL of one model to another compares their ids too). Read from
    each folder's tokenizer.json (no tokenizer code runs); folders without one are not compared."""
    given = [f for f in folders if (f / "tokenizer.json").is_file()]
    vocabularies = [_vocabulary(f / "tokenizer.json") for f in given]
    for folder, vocabulary in zip(given[1:], vocabularies[1:]):
        first = vocabularies[0]
        if vocabulary != first:
            token = next(t for t in sorted(first.keys() | vocabulary.keys()) if first.get(t) != vocabulary.get(t))
            raise MergeError(
                f"{folder} and {given[0]} have different tokenizers ({len(vocabulary)} and {len(first)} tokens; "
                f"token {token!r} is id {vocabulary.get(token, 'absent')} in one, {first.get(token, 'absent')} in "
                f"the other): {why}"
            )


def _vocabulary(path: Path) -> dict[str, int]:
    """Token -> id of a tokenizer.json: its model's vocabulary (a mapping, or Unigram's list) and its added tokens."""
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"].get("vocab") or {}
    tokens = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab)}
    return tokens | {added["content"]: added["id"] for added in tokenizer.get("added_tokens", [])}


def slerp_folders(
    init: Folder, models: Sequence[Folder], out: Folder, weights: Sequence[float] | None = None, **kw
) -> Path:
    """`warp_ray.merge.slerp` on folders: SLERP of the models' task vectors relative to init."""
    if not models:
        raise MergeError("slerp needs at least one model folder")
    return merge_folders(slerp_merge(len(models), weights), [init, *models], out, **kw)


def average_folders(models: Sequence[Folder], out: Folder, weights: Sequence[float] | None = None, **kw) -> Path:
    """`warp_ray.merge.average` on folders: the weighted average of whole weights (WARM)."""
    if not models:
        raise MergeError("average needs at least one model folder")
    return merge_folders(average_merge(len(models), weights), models, out, **kw)


def soup_folders(
    policies: Sequence[Folder], out: Folder, lambdas: Sequence[float], init: Folder | None = None, **kw
) -> Path:
    """`warp_ray.merge.soup` on folders: the rewarded soup at lambda, linear, or by SLERP of the task
    vectors relative to `init` when one is given."""
    lambdas = simplex(lambdas, len(policies))
    if init is None:
        return average_folders(policies, out, lambdas, **kw)
    return slerp_folders(init, policies, out, lambdas, **kw)


def liti_folders(init: Folder, merged: Folder, out: Folder, eta: float, **kw) -> Path:
    """`warp_ray.merge.liti` on folders: (1 - eta) * init + eta * merged."""
    return merge_folders(liti_merge(eta), [init, merged], out, **kw)
