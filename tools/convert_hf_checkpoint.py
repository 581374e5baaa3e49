"""Convert Llama / Mistral / Qwen2 checkpoints between Hugging Face and Megatron (dist checkpoint).

    # HF -> Megatron (weights only; loads on any TP/PP layout with the same padded vocabulary)
    python tools/convert_hf_checkpoint.py import --hf-dir Llama-3.2-1B --output ckpt/llama \\
        --make-vocab-size-divisible-by 128 --tensor-model-parallel-size 2
    # Megatron (any layout, e.g. a training run's --save) -> HF
    python tools/convert_hf_checkpoint.py export --load runs/simpo --output out/llama-simpo \\
        --hf-config Llama-3.2-1B

Import keeps the HF config.json and tokenizer files in OUTPUT/hf_config/, which export uses
by default. Each conversion builds the whole model in one CPU (or GPU) process and writes
OUTPUT only when it succeeds. The code is simpo_megatron.model.hf_convert.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Like Megatron-LM's tools: run from a checkout without installing the package. The import
    # stays under the guard: dist_checkpointing's save re-imports this file in a helper process.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from simpo_megatron.model.hf_convert import main

    sys.exit(main())
