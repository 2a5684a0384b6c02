"""Hugging Face model folders on disk: weight layout, streamed safetensors, atomic writes.

Weights are only ever read from safetensors files, never unpickled. Folders are written
under a temporary name and renamed when complete, so that a crash or a full disk never
leaves a half-written folder under the final name, nor destroys the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Iterator, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from warp_ray.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def check_model_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    return folder


def model_config(folder: Path) -> dict:
    """A model folder's config.json, read."""
    try:
        return json.loads((check_model_folder(folder) / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e})") from None


def architecture(folder: Path) -> str:
    """What a model folder's config.json says it is: its model type and classes, e.g. "gpt2 (GPT2LMHeadModel)"."""
    config = model_config(folder)
    return f"{config.get('model_type')} ({', '.join(config.get('architectures') or ['no architectures listed'])})"


SAVE_RECORDS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
"""Keys of a config.json or generation_config.json that say where, by which version and in which
dtype a model was saved, not what it computes."""


def _files_but_weights(folder: Path) -> dict[str, object]:
    """What a model folder holds besides its weights, as compared by `same_model`: config.json and
    generation_config.json read (but for SAVE_RECORDS), every other file (tokenizer, chat template,
    model code) as bytes."""
    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix in (".safetensors", *PICKLED_WEIGHTS) or path.name == INDEX_FILE:
            continue
        if path.name in ("config.json", "generation_config.json"):
            files[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in SAVE_RECORDS}
        else:
            files[path.name] = path.read_bytes()
    return files


def same_model(a: str | Path, b: str | Path) -> bool:
    """Whether two model folders hold the same model but for its weights: the same tensors, by name
    and shape, and the same files besides (`_files_but_weights`: the config, the tokenizer and its
    chat template, the generation config). An engine built for one samples as one built for the
    other once handed the other's weights."""
    a, b = check_model_folder(a), check_model_folder(b)
    shapes_a, shapes_b = ({n: t.shape for n, t in weight_layout(f).items()} for f in (a, b))
    return shapes_a == shapes_b and _files_but_weights(a) == _files_but_weights(b)


def weight_files(folder: Path) -> list[str]:
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / INDEX_FILE} is not a valid safetensors index ({e})") from None
        return sorted(set(weight_map.values()))
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    hint = (
        f" (it has {', '.join(pickled)}: warp-ray never unpickles weights; re-save them with safetensors)"
        if pickled
        else ""
    )
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} nor {INDEX_FILE}{hint}")


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def weight_layout(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder: its file, shape and dtype, read from the headers only."""
    folder = check_model_folder(folder)
    layout = {}
    for file in weight_files(folder):
        with open_safetensors(folder / file) as f:
            for name in f.keys():
                view = f.get_slice(name)
                layout[name] = TensorInfo(file, tuple(view.get_shape()), DTYPES[view.get_dtype()])
    return layout


def write_safetensors(
    path: Path, layout: Mapping[str, TensorInfo], chunks: Callable[[str], Iterable[Tensor]], metadata: Mapping[str, str]
) -> None:
    """Write the tensors of `layout` to one safetensors file; `chunks(name)` yields each one's data in order.

    The safetensors library serializes whole dicts; the header only needs shapes and dtypes,
    known in advance, so the data can follow chunk by chunk and memory stays at one chunk.
    """
    header, offset = {}, 0
    for name, info in layout.items():
        size = info.dtype.itemsize * int(torch.Size(info.shape).numel())
        header[name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, info in layout.items():
            written = 0
            for chunk in chunks(name):
                if chunk.dtype != info.dtype:
                    raise CheckpointError(f"tensor {name!r}: got {chunk.dtype} data, expected {info.dtype}")
                written += f.write(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
            begin, end = header[name]["data_offsets"]
            if written != end - begin:
                raise CheckpointError(f"tensor {name!r}: got {written} bytes of data, expected {end - begin}")
        f.flush()
        os.fsync(f.fileno())


def copy_non_weight_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, shard index and the rest: everything but the weight files."""
    for path in src.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", *PICKLED_WEIGHTS):
            shutil.copy2(path, dst / path.name)


def save_model(shards: Iterable[Mapping[str, Tensor]], like: Path, folder: Path, count: int = 1) -> None:
    """Make `folder` (an existing one, such as `atomic_dir`'s) a Hugging Face model folder: the
    weights, given as `count` dicts (shards, taken one at a time from an iterator, so that one is
    in memory at once), in model.safetensors, or for several in model-0000k-of-0000n.safetensors
    with their index; config and tokenizer from the folder `like`."""
    copy_non_weight_files(like, folder)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # `like`'s layout may differ from this one
    files = [SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    weight_map, total_size = {}, 0
    for file, shard in zip(files, shards, strict=True):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total_size += sum(t.numel() * t.element_size() for t in shard.values())
    if count > 1:
        (folder / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        )


def meta_model(model_config: "PretrainedConfig", trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of a config, built on PyTorch's meta device: its shapes and ties, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def tied_weights(folder: str | Path, trust_remote_code: bool = False) -> dict[str, str]:
    """A model folder's tied weight names, each with the name its checkpoint saves it under (the one copy)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return dict(meta_model(model_config, trust_remote_code).all_tied_weights_keys)


def load_model_weights(folder: str | Path, names: Optional[Collection[str]] = None) -> dict[str, Tensor]:
    """The weights of a Hugging Face folder (one file or shards), all or those `names`, from safetensors only."""
    folder = check_model_folder(folder)
    weights = {}
    for file in weight_files(folder):
        with open_safetensors(folder / file) as f:
            weights.update({name: f.get_tensor(name) for name in f.keys() if names is None or name in names})
    return weights


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole, or keeps what it held: written beside it, then renamed."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def context_length(folder: str | Path, tokenizer: "PreTrainedTokenizerBase", trust_remote_code: bool) -> int:
    """The longest sequence a model folder takes: its position embeddings, or its tokenizer's limit
    if lower (a tokenizer that sets none says 1e30, which vLLM refuses as a max_model_len)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    positions = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(positions, tokenizer.model_max_length))
