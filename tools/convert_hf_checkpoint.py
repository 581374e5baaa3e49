"""Convert Llama / Mistral / Qwen2 / Gemma-2 checkpoints between Hugging Face and Megatron (dist checkpoint).

    # HF -> Megatron (weights only; loads on any TP/PP layout with the same padded vocabulary)
    python tools/convert_hf_checkpoint.py import --hf-dir Llama-3.2-1B --output ckpt/llama \\
        --make-vocab-size-divisible-by 128 --tensor-model-parallel-size 2
    # Megatron (any layout, e.g. a training run's --save) -> HF
    python tools/convert_hf_checkpoint.py export --load runs/simpo --output out/llama-simpo \\
        --hf-config Llama-3.2-1B

Import keeps the HF config.json and tokenizer files in OUTPUT/hf_config/, which export uses
by default (a run started with --load HF_DIR keeps them in SAVE/hf_config/). Import builds
the model at TP=1/PP=1 in this process; export reads the checkpoint's global tensors and
builds no model. Each writes OUTPUT only when it succeeds. The same command as `simpo-convert`,
which an installed package puts on PATH. The code is simpo_megatron.training.hf_checkpoint
(import, export, CLI) on simpo_megatron.hf (the mappings).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # The import stays under the guard: dist_checkpointing's save re-imports this file in a
    # helper process.
    try:
        import simpo_megatron  # noqa: F401  the installed package
    except ImportError:  # not installed: run from this checkout, as Megatron-LM's tools do
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from simpo_megatron.cli import convert

    sys.exit(convert())
