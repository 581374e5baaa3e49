"""Hugging Face checkpoints to Megatron dist checkpoints and back, and starting a run from one.

- ``import_hf_checkpoint``: HF directory -> ``OUTPUT/iter_0000000`` (weights only, loads on any
  TP/PP layout), with the HF config and tokenizer files in ``OUTPUT/hf_config/``.
- ``export_checkpoint``: any simpo-megatron checkpoint (any layout, resharded by
  dist_checkpointing) -> an HF directory that ``from_pretrained`` loads.
- ``ensure_megatron_checkpoint``: lets ``--load`` name an HF directory: converts it once, in a
  subprocess on rank 0 (conversion builds a TP=1/PP=1 model, which a model-parallel world cannot).

Both conversions build the whole model in one process and write to ``OUTPUT.tmp``, renamed
into place at the end: a failure leaves nothing behind. ``main`` is the CLI of
``tools/convert_hf_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.validation import StrictHandling

from simpo_megatron.config import SimPOConfig
from simpo_megatron.model.gpt import build_model
from simpo_megatron.model.hf import (
    TOKENIZER_FILES,
    HFConversionError,
    hf_config_dtype,
    hf_config_to_overrides,
    hf_to_megatron,
    is_hf_checkpoint,
    load_safetensors,
    megatron_to_hf,
    model_config,
    model_config_dict,
    overrides_to_hf_config,
    parse_dtype,
    parse_size,
    read_hf_config,
    safetensors_files,
    save_safetensors,
    sliding_window,
)
from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed
from simpo_megatron.training.checkpointing import (
    TRACKER_FILE,
    CheckpointError,
    checkpoint_dir,
    read_tracker,
    save_checkpoint,
)

HF_CONFIG_DIR = "hf_config"  # config.json and tokenizer files of the source model
CONVERSION_FILE = "conversion.json"  # where an imported checkpoint came from
CACHE_DIR = "hf_import"  # under --save: ensure_megatron_checkpoint's conversion
_TORCHRUN_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """torch.distributed and megatron's parallel state for one TP=1/PP=1 process."""
    started = not dist.is_initialized()
    if started:
        initialize_distributed(ParallelLayout(1, 1))
    elif (dist.get_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
          parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1, 1):
        raise HFConversionError(
            "conversion builds the whole model in one process: run tools/convert_hf_checkpoint.py "
            "on its own, not inside a multi-process run"
        )
    try:
        yield
    finally:
        if started:
            destroy_distributed()


@contextlib.contextmanager
def _staged(output: str) -> Iterator[str]:
    """A fresh ``OUTPUT.tmp`` to write into, renamed to ``output`` on success, removed on failure."""
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise HFConversionError(f"{output} exists: remove it or choose another output")
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, output)


def _copy_files(src: str, dst: str, names: Sequence[str]) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _fingerprint(hf_dir: str) -> str:
    """Identifies an HF directory's contents cheaply: config.json and the weight files' sizes and times."""
    digest = hashlib.sha256()
    with open(os.path.join(hf_dir, "config.json"), "rb") as fh:
        digest.update(fh.read())
    for path in safetensors_files(hf_dir):
        st = os.stat(path)
        digest.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def import_hf_checkpoint(
    hf_dir: str,
    output: str,
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> str:
    """Convert the HF model in ``hf_dir`` into a weights-only Megatron checkpoint at ``output``.

    The vocabulary is padded with zero rows to a multiple of ``make_vocab_size_divisible_by x
    tensor_model_parallel_size``, as the training run will pad it (the checkpoint itself
    loads on any TP/PP layout with the same padded size). Returns ``output``.
    """
    hf_config = read_hf_config(hf_dir)
    cfg = SimPOConfig.from_flat(
        hf_config_to_overrides(hf_config),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    padded_vocab_size = cfg.padded_vocab_size()
    cfg = cfg.replace(tensor_model_parallel_size=1)
    state = hf_to_megatron(load_safetensors(hf_dir), cfg, padded_vocab_size)
    window = sliding_window(hf_config)
    if window is not None and window < (cfg.max_position_embeddings or 0):
        warnings.warn(
            f"{hf_dir}: sliding_window={window}: the converted model uses full causal attention, "
            f"which matches the HF model on sequences of up to {window} tokens"
        )
    with _staged(output) as tmp:
        with _single_process_world():
            model = build_model(cfg, padded_vocab_size)[0]
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:  # the mapping and the layer spec disagree: a bug here
                raise RuntimeError(f"HF mapping does not fit GPTModel: missing {missing}, unexpected {unexpected}")
            del state
            save_checkpoint(
                tmp, types.SimpleNamespace(model=[model], iteration=0),
                config_dict=model_config_dict(cfg), weights_only=True,
            )
        _copy_files(hf_dir, os.path.join(tmp, HF_CONFIG_DIR), ("config.json", *TOKENIZER_FILES))
        with open(os.path.join(tmp, CONVERSION_FILE), "w") as fh:
            json.dump(
                {
                    "hf_dir": os.path.abspath(hf_dir),
                    "fingerprint": _fingerprint(hf_dir),
                    "padded_vocab_size": padded_vocab_size,
                    "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
                    "tensor_model_parallel_size": tensor_model_parallel_size,
                },
                fh, indent=2,
            )
    return os.path.abspath(output)


def _resolve_checkpoint(load: str) -> str:
    """The dist checkpoint directory of ``load``: a save root (via its tracker) or an iter_* directory."""
    iteration = read_tracker(load)
    if iteration is not None:
        return checkpoint_dir(load, iteration)
    if os.path.isfile(os.path.join(load, "metadata.json")):
        return load
    raise HFConversionError(f"{load}: not a Megatron checkpoint (no {TRACKER_FILE} and no metadata.json)")


def export_checkpoint(
    load: str,
    output: str,
    *,
    hf_config_dir: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> str:
    """Convert the newest checkpoint under ``load`` (any TP/PP layout) into an HF directory.

    ``hf_config_dir`` (default: ``LOAD/hf_config`` from an import) supplies the original
    config.json, whose other entries are kept, and the tokenizer files, which are copied.
    ``dtype`` defaults to that config's dtype, else float32. Returns ``output``.
    """
    ckpt = _resolve_checkpoint(load)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    if "config" not in common:
        raise HFConversionError(f"{ckpt} records no model config (save it with save_checkpoint(config_dict=...))")
    cfg = model_config(common["config"])
    if hf_config_dir is None and os.path.isdir(os.path.join(load, HF_CONFIG_DIR)):
        hf_config_dir = os.path.join(load, HF_CONFIG_DIR)
    base = read_hf_config(hf_config_dir) if hf_config_dir else None
    if base is None:
        warnings.warn(f"{load}: no HF config given (--hf-config): writing a fresh config.json and no tokenizer files")
    torch_dtype = parse_dtype(dtype) if dtype else (base and hf_config_dtype(base)) or torch.float32
    hf_config = overrides_to_hf_config(cfg, base, torch_dtype)
    max_shard_bytes = parse_size(max_shard_size)

    with _staged(output) as tmp:
        with _single_process_world():
            model = build_model(cfg, common["padded_vocab_size"])[0]
            loaded = dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, ckpt, strict=StrictHandling.ASSUME_OK_UNEXPECTED
            )
            model.load_state_dict(loaded["model"])
            del loaded
            tensors = megatron_to_hf(model.state_dict(), cfg, torch_dtype)
            del model
        save_safetensors(tensors, tmp, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(hf_config, fh, indent=2)
        if hf_config_dir:
            _copy_files(hf_config_dir, tmp, TOKENIZER_FILES)
    return os.path.abspath(output)


def ensure_megatron_checkpoint(load_path: str, cfg: SimPOConfig) -> str:
    """``load_path`` itself, or for an HF directory the Megatron checkpoint converted from it.

    Collective over all ranks when torch.distributed is initialized. Rank 0 converts once,
    into ``SAVE/hf_import`` (reused while the HF files and the padded vocabulary are the
    same) or, without ``--save``, into a temporary directory (single node only), by running
    the converter in a subprocess on the CPU.
    """
    if not is_hf_checkpoint(load_path):
        return load_path
    overrides = hf_config_to_overrides(read_hf_config(load_path), seq_length=cfg.seq_length)
    padded_vocab_size = cfg.replace(**overrides).padded_vocab_size()
    distributed = dist.is_initialized()
    result: list[str | None] = [None, None]  # [output, error]
    if not distributed or dist.get_rank() == 0:
        try:
            result[0] = _convert_once(load_path, cfg, padded_vocab_size)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result[1] = f"{type(e).__name__}: {e}"
    if distributed:
        dist.broadcast_object_list(result, src=0)
    output, error = result
    if error is not None:
        raise HFConversionError(f"converting {load_path} failed: {error}")
    if not os.path.isdir(output):
        raise HFConversionError(
            f"{output} (converted from {load_path} on rank 0) is not visible on rank {dist.get_rank()}: "
            "set --save to a directory on a shared file system"
        )
    return output


def _convert_once(hf_dir: str, cfg: SimPOConfig, padded_vocab_size: int) -> str:
    """Rank 0's part of ensure_megatron_checkpoint: reuse a matching conversion or make one."""
    if cfg.save:
        output = os.path.join(cfg.save, CACHE_DIR)
    else:
        output = os.path.join(tempfile.mkdtemp(prefix="simpo_hf_import_"), "checkpoint")
    source = {"fingerprint": _fingerprint(hf_dir), "padded_vocab_size": padded_vocab_size}
    record = os.path.join(output, CONVERSION_FILE)
    if os.path.isfile(record):
        with open(record) as fh:
            previous = json.load(fh)
        if {key: previous.get(key) for key in source} == source:
            return output
    shutil.rmtree(output, ignore_errors=True)
    print(f"converting the Hugging Face model {hf_dir} into {output}", flush=True)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # convert on the CPU: the GPUs belong to the run
    # ``-c``, not ``-m``: dist_checkpointing's save re-imports a main module in a helper process.
    code = "import sys; from simpo_megatron.model.hf_convert import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [
            sys.executable, "-c", code, "import",
            "--hf-dir", hf_dir, "--output", output,
            "--make-vocab-size-divisible-by", str(cfg.make_vocab_size_divisible_by),
            "--tensor-model-parallel-size", str(cfg.tensor_model_parallel_size),
        ],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise HFConversionError(lines[-1] if lines else f"the converter exited with {proc.returncode}")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_hf_checkpoint.py",
        description="Convert Llama / Mistral / Qwen2 checkpoints between Hugging Face and Megatron.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> Megatron checkpoint (weights only)")
    imp.add_argument("--hf-dir", required=True, help="HF model directory: config.json and *.safetensors.")
    imp.add_argument("--output", required=True, help="Megatron checkpoint directory to create.")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="Pad the vocabulary to a multiple of this x TP, as the training run does.")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP size of the training run; only affects the vocabulary padding.")
    exp = commands.add_parser("export", help="Megatron checkpoint (any layout) -> HF directory")
    exp.add_argument("--load", required=True, help="Checkpoint root (with its tracker file) or iter_* directory.")
    exp.add_argument("--output", required=True, help="HF model directory to create.")
    exp.add_argument("--hf-config",
                     help=f"Original HF directory: config.json and tokenizer (default: LOAD/{HF_CONFIG_DIR}).")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="Dtype of the weights (default: the original config's, else float32).")
    exp.add_argument("--max-shard-size", default="5GB", help="Largest safetensors file, e.g. 5GB, 500MB.")
    args = parser.parse_args(argv)

    try:
        if args.command == "import":
            path = import_hf_checkpoint(
                args.hf_dir, args.output,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
            )
        else:
            path = export_checkpoint(
                args.load, args.output, hf_config_dir=args.hf_config, dtype=args.dtype,
                max_shard_size=args.max_shard_size,
            )
    except (HFConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0

