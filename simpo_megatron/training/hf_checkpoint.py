"""Checkpoint conversion between Hugging Face and Megatron, both ways, and the CLI of
tools/convert_hf_checkpoint.py.

- ``import_hf_checkpoint``: an HF directory -> a weights-only training checkpoint. It builds
  the whole model at TP=1/PP=1 in this process, fills it through ``hf.load_hf_weights`` and
  saves it as a dist checkpoint, which loads on any TP/PP layout with the same padded vocabulary.
- ``export_checkpoint``: a training checkpoint (any TP/PP/VPP layout) -> an HF directory, read
  as global tensors, with no model and no model-parallel world.

Both write ``OUTPUT.tmp`` and rename it into place at the end: a failure leaves nothing behind.
The mappings themselves are ``simpo_megatron.hf`` (config.json and tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
import warnings
from collections.abc import Iterator, Sequence

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from simpo_megatron.checkpoint_format import CheckpointError, resolve_checkpoint
from simpo_megatron.config import SimPOConfig
from simpo_megatron.fsutil import staged_directory
from simpo_megatron.hf import HF_CONFIG_DIR, HFConversionError, load_hf_weights, save_hf_config
from simpo_megatron.hf.config_mapping import (
    hf_config_to_overrides,
    model_config_dict,
    model_config_from_dict,
    sliding_window,
    to_hf_config,
)
from simpo_megatron.hf.files import (
    DTYPES,
    TOKENIZER_FILES,
    copy_files,
    hf_config_dtype,
    parse_dtype,
    parse_size,
    read_hf_config,
    save_safetensors,
)
from simpo_megatron.hf.sharded import read_checkpoint_tensors
from simpo_megatron.hf.tensor_mapping import megatron_to_hf
from simpo_megatron.model.gpt import build_model
from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed
from simpo_megatron.training.checkpointing import save_checkpoint

CONVERSION_FILE = "conversion.json"  # where an imported checkpoint came from


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """torch.distributed and megatron's parallel state for one TP=1/PP=1 process."""
    started = not dist.is_initialized()
    if started:
        initialize_distributed(ParallelLayout(1, 1))
    elif (
        dist.get_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    ) != (1, 1, 1):
        raise HFConversionError(
            "import builds the whole model in one process: run tools/convert_hf_checkpoint.py "
            "on its own, not inside a multi-process run (a run loads an HF directory itself: --load HF_DIR)"
        )
    try:
        yield
    finally:
        if started:
            destroy_distributed()


def import_hf_checkpoint(
    hf_dir: str,
    output: str,
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> str:
    """Convert the HF model in ``hf_dir`` into a weights-only Megatron checkpoint at ``output``.

    The vocabulary is padded with zero rows to a multiple of ``make_vocab_size_divisible_by x
    tensor_model_parallel_size``, as the training run will pad it. Returns ``output``.
    """
    hf_config = read_hf_config(hf_dir)
    cfg = SimPOConfig.from_flat(
        hf_config_to_overrides(hf_config),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    padded_vocab_size = cfg.padded_vocab_size()
    cfg = cfg.replace(tensor_model_parallel_size=1)
    window = sliding_window(hf_config)
    if window is not None and cfg.model.sliding_window is None:
        warnings.warn(
            f"{hf_dir}: sliding_window={window} on some layers only: the converted model uses full causal "
            f"attention, which matches the HF model on sequences of up to {window} tokens",
            stacklevel=2,
        )
    try:
        with staged_directory(output) as tmp:
            with _single_process_world():
                model = build_model(cfg.model, cfg.parallel_layout(), padded_vocab_size)
                load_hf_weights(hf_dir, model, cfg)
                save_checkpoint(
                    tmp,
                    types.SimpleNamespace(model=model, iteration=0),
                    config_dict=model_config_dict(cfg.model),
                    weights_only=True,
                )
                del model
            save_hf_config(hf_dir, tmp)
            with open(os.path.join(tmp, CONVERSION_FILE), "w") as fh:
                json.dump(
                    {
                        "hf_dir": os.path.abspath(hf_dir),
                        "padded_vocab_size": padded_vocab_size,
                        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
                        "tensor_model_parallel_size": tensor_model_parallel_size,
                    },
                    fh,
                    indent=2,
                )
    except FileExistsError as e:
        raise HFConversionError(str(e)) from None
    return os.path.abspath(output)


def export_checkpoint(
    load: str,
    output: str,
    *,
    hf_config_dir: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> str:
    """Convert the newest checkpoint under ``load`` (any TP/PP/VPP layout) into an HF directory.

    ``hf_config_dir`` (default: ``LOAD/hf_config``) supplies the original config.json, whose
    other entries are kept, and the tokenizer files, which are copied. ``dtype`` defaults to
    that config's dtype, else float32. Returns ``output``, written atomically.
    """
    ckpt = resolve_checkpoint(load)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    if "config" not in common:
        raise HFConversionError(f"{ckpt} records no model config (save it with save_checkpoint(config_dict=...))")
    cfg = SimPOConfig(model=model_config_from_dict(common["config"]))
    if hf_config_dir is None and os.path.isdir(os.path.join(load, HF_CONFIG_DIR)):
        hf_config_dir = os.path.join(load, HF_CONFIG_DIR)
    base = read_hf_config(hf_config_dir) if hf_config_dir else None
    if base is None:
        warnings.warn(
            f"{load}: no HF config given (--hf-config): writing a fresh config.json and no tokenizer files",
            stacklevel=2,
        )
    dtype_name = dtype or (base and hf_config_dtype(base)) or "float32"
    hf_config = to_hf_config(cfg, base, dtype_name)
    max_shard_bytes = parse_size(max_shard_size)
    try:
        with staged_directory(output) as tmp:
            tensors = megatron_to_hf(read_checkpoint_tensors(ckpt), cfg.model, parse_dtype(dtype_name))
            save_safetensors(tensors, tmp, max_shard_bytes)
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(hf_config, fh, indent=2)
            if hf_config_dir:
                copy_files(hf_config_dir, tmp, TOKENIZER_FILES)
    except FileExistsError as e:
        raise HFConversionError(str(e)) from None
    return os.path.abspath(output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="simpo-convert",
        description="Convert Llama / Mistral / Qwen2 / Gemma-2 checkpoints between Hugging Face and Megatron.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> Megatron checkpoint (weights only)")
    imp.add_argument("--hf-dir", required=True, help="HF model directory: config.json and *.safetensors.")
    imp.add_argument("--output", required=True, help="Megatron checkpoint directory to create.")
    imp.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this x TP, as the training run does.",
    )
    imp.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP size of the training run; only affects the vocabulary padding.",
    )
    exp = commands.add_parser("export", help="Megatron checkpoint (any layout) -> HF directory")
    exp.add_argument("--load", required=True, help="Checkpoint root (with its tracker file) or iter_* directory.")
    exp.add_argument("--output", required=True, help="HF model directory to create.")
    exp.add_argument(
        "--hf-config", help=f"Original HF directory: config.json and tokenizer (default: LOAD/{HF_CONFIG_DIR})."
    )
    exp.add_argument(
        "--dtype", choices=tuple(DTYPES), help="Dtype of the weights (default: the original config's, else float32)."
    )
    exp.add_argument("--max-shard-size", default="5GB", help="Largest safetensors file, e.g. 5GB, 500MB.")
    args = parser.parse_args(argv)

    try:
        if args.command == "import":
            path = import_hf_checkpoint(
                args.hf_dir,
                args.output,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
            )
        else:
            path = export_checkpoint(
                args.load,
                args.output,
                hf_config_dir=args.hf_config,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
            )
    except (HFConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
