"""The tiny example that ``bash examples/pretrain_simpo.sh`` trains when given no data.

Its data is the checkout's examples/data (JSONL pairs and a SentencePiece model), preprocessed
on first use, in the process, one rank at a time. Flags given to the launcher without
``--config``, ``--data-path`` or ``--mock-data`` apply on top of the example's.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence

from simpo_megatron.data.preprocess import preprocess_pairs

# Any of these means the user describes a run of their own.
OWN_RUN_FLAGS = ("--config", "--data-path", "--mock-data")


def is_own_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names its own data or recipe (then the example adds nothing)."""
    return any(arg.split("=", 1)[0] in OWN_RUN_FLAGS for arg in argv)


def tokenizer_flags(root: str) -> list[str]:
    """The example's tokenizer, in the checkout ``root``."""
    return [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        os.path.join(root, "examples", "data", "tokenizer.model"),
    ]


def prepare_data(root: str) -> dict[str, str]:
    """Preprocess ``root``/examples/data/{train,valid}.jsonl once; return the prefixes by split."""
    data = os.path.join(root, "examples", "data")
    prefixes = {split: os.path.join(data, f"{split}_pairs") for split in ("train", "valid")}
    with open(os.path.join(data, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank preprocesses; the others wait, then reuse
        for split, prefix in prefixes.items():
            if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".meta.json")):
                print(
                    preprocess_pairs(
                        os.path.join(data, f"{split}.jsonl"),
                        prefix,
                        "SentencePieceTokenizer",
                        os.path.join(data, "tokenizer.model"),
                    ),
                    flush=True,
                )
    return prefixes


def with_example_defaults(argv: Sequence[str], root: str) -> list[str]:
    """``argv`` as given for a run of the user's own, else the example's flags (from the checkout
    ``root``) followed by ``argv``.

    The example writes to ``$OUTPUT_DIR`` (default ``root``/runs/tiny) and resumes from it.
    """
    if is_own_run(argv):
        return list(argv)
    prefixes = prepare_data(root)
    output = os.environ.get("OUTPUT_DIR", os.path.join(root, "runs", "tiny"))
    return [
        "--config",
        os.path.join(root, "examples", "configs", "tiny.yaml"),
        "--data-path",
        prefixes["train"],
        "--valid-data-path",
        prefixes["valid"],
        *tokenizer_flags(root),
        "--save",
        output,
        "--load",
        output,
        *argv,
    ]
