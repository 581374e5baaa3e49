"""Tokenize preference pairs into a megatron-core indexed dataset (PREFIX.bin/.idx + PREFIX.meta.json).

The same command as `simpo-preprocess`, which an installed package puts on PATH; `--help` lists
the flags, and simpo_megatron/data/preprocess.py holds the code.

    python tools/preprocess_preference_data.py --input train.jsonl --output-prefix data/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --workers 4
"""

import os
import sys

if __name__ == "__main__":
    try:
        import simpo_megatron  # noqa: F401  the installed package
    except ImportError:  # not installed: run from this checkout, as Megatron-LM's tools do
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from simpo_megatron.cli import preprocess

    sys.exit(preprocess())
