"""Hugging Face model directories: config.json, safetensors weights, tokenizer files."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simpo_megatron.hf.errors import HFConversionError

# Files besides the weights that make an HF model directory usable; copied through conversions.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HFConversionError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_config_dtype(hf_config: Mapping[str, Any]) -> str | None:
    """The name of the weights' dtype an HF config declares (``dtype`` or ``torch_dtype``), if any."""
    name = hf_config.get("dtype", hf_config.get("torch_dtype"))
    return name if name in DTYPES else None


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFConversionError(f"{hf_dir}: no config.json")
    with open(path) as fh:
        return json.load(fh)


def safetensors_files(hf_dir: str) -> list[str]:
    """The weight files of an HF directory: those its index names, or every *.safetensors."""
    index = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(hf_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` is an HF model directory (config.json and safetensors weights)."""
    return os.path.isfile(os.path.join(path, "config.json")) and bool(safetensors_files(path))


class SafetensorsDir(Mapping[str, torch.Tensor]):
    """The tensors of an HF directory (sharded with an index, or not), each read from its
    memory-mapped file when accessed, so a reader holds only what it asks for."""

    def __init__(self, hf_dir: str):
        files = safetensors_files(hf_dir)
        if not files:
            raise HFConversionError(f"{hf_dir}: no *.safetensors weights (convert .bin weights to safetensors first)")
        self._files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            if not os.path.isfile(path):
                raise HFConversionError(f"{SAFETENSORS_INDEX} names {os.path.basename(path)}, which is missing")
            with safe_open(path, framework="pt") as fh:
                for name in fh.keys():
                    if name in self._files:
                        raise HFConversionError(f"tensor {name} is stored in more than one file")
                    self._files[name] = path
                    self.shapes[name] = tuple(fh.get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], framework="pt") as fh:
            return fh.get_tensor(name)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def parse_size(size: str | int) -> int:
    """Bytes from 12345, '500MB', '5GB' or '100KB' (decimal units, as Hugging Face uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, scale in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def save_safetensors(tensors: Mapping[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Write ``model.safetensors``, or shards with an index above ``max_shard_bytes``; returns the files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {t: name for name, shard in zip(names, shards) for t in shard},
        }
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as fh:
            json.dump(index, fh, indent=2)
    return names


def copy_files(src: str, dst: str, names: Sequence[str]) -> None:
    """Copy those of ``names`` that exist in ``src`` into ``dst`` (created if needed)."""
    os.makedirs(dst, exist_ok=True)
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
