"""The merges of `warp_ray.merge` on Hugging Face model folders, streamed tensor by tensor.

Peak memory stays near one tensor per input model, whatever the model size: tensors are
read one at a time from safetensors files and written to the output as they are merged.
The output keeps the first input's shard layout, config and tokenizer files, so it loads
with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from warp_ray.checkpoint import atomic_dir, copy_non_weight_files, open_safetensors, read_tensor, weight_files, weight_layout, write_safetensors
from warp_ray.errors import MergeError
from warp_ray.merge.linear import check_eta, linear_combination, normalized_weights
from warp_ray.merge.slerp import slerp_tensor
from warp_ray.merge.state_dict import MergeFn, check_compatible, merge_tensor

Folder = str | Path


def merge_folders(fn: MergeFn, folders: Sequence[Folder], out: Folder, overwrite: bool = False, progress: bool = True) -> Path:
    """Apply the per-tensor merge `fn` to model folders; folders[0] is the reference (dtype, layout, files)."""
    folders = [Path(f) for f in folders]
    layouts = [weight_layout(f) for f in folders]
    check_compatible([{k: (i.shape, i.dtype) for k, i in lay.items()} for lay in layouts], [str(f) for f in folders])
    reference = layouts[0]
    with open_safetensors(folders[0] / weight_files(folders[0])[0]) as f:
        metadata = {**(f.metadata() or {}), "format": "pt"}
    bar = tqdm(total=len(reference), unit="tensor", desc=f"merge -> {out}", disable=not progress)

    def merged(name: str):
        bar.update()
        return merge_tensor(fn, [read_tensor(f, name, lay[name]) for f, lay in zip(folders, layouts)])

    with bar, atomic_dir(out, overwrite) as tmp:
        copy_non_weight_files(folders[0], tmp)
        for file, names in groupby(sorted(reference, key=lambda n: reference[n].file), key=lambda n: reference[n].file):
            write_safetensors(tmp / file, {n: reference[n] for n in names}, merged, metadata)
    return Path(out)


def slerp_folders(init: Folder, models: Sequence[Folder], out: Folder, weights: Sequence[float] | None = None, **kw) -> Path:
    """`warp_ray.merge.slerp` on folders: SLERP of the models' task vectors relative to init."""
    if not models:
        raise MergeError("slerp needs at least one model folder")
    normalized_weights(weights, len(models))
    return merge_folders(partial(slerp_tensor, weights=weights), [init, *models], out, **kw)


def average_folders(models: Sequence[Folder], out: Folder, weights: Sequence[float] | None = None, **kw) -> Path:
    """`warp_ray.merge.average` on folders: the weighted average of whole weights (WARM)."""
    if not models:
        raise MergeError("average needs at least one model folder")
    return merge_folders(partial(linear_combination, coefficients=normalized_weights(weights, len(models))), models, out, **kw)


def liti_folders(init: Folder, merged: Folder, out: Folder, eta: float, **kw) -> Path:
    """`warp_ray.merge.liti` on folders: (1 - eta) * init + eta * merged."""
    eta = check_eta(eta)
    return merge_folders(partial(linear_combination, coefficients=(1.0 - eta, eta)), [init, merged], out, **kw)
