"""The tiny example that ``bash examples/pretrain_simpo.sh`` trains when given no data.

Its data is examples/data (JSONL pairs and a SentencePiece model), preprocessed on first use
by tools/preprocess_preference_data.py, one rank at a time. Flags given to the launcher
without ``--config``, ``--data-path`` or ``--mock-data`` apply on top of the example's.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(DATA, "tokenizer.model")]
# Any of these means the user describes a run of their own.
OWN_RUN_FLAGS = ("--config", "--data-path", "--mock-data")


def is_own_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names its own data or recipe (then the example adds nothing)."""
    return any(arg.split("=", 1)[0] in OWN_RUN_FLAGS for arg in argv)


def prepare_data() -> dict[str, str]:
    """Preprocess examples/data/{train,valid}.jsonl once; return the prefixes by split."""
    prefixes = {split: os.path.join(DATA, f"{split}_pairs") for split in ("train", "valid")}
    with open(os.path.join(DATA, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank preprocesses; the others wait, then reuse
        for split, prefix in prefixes.items():
            if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".meta.json")):
                subprocess.run(
                    [sys.executable, os.path.join(ROOT, "tools", "preprocess_preference_data.py"),
                     "--input", os.path.join(DATA, f"{split}.jsonl"), "--output-prefix", prefix, *TOKENIZER],
                    check=True,
                )
    return prefixes


def with_example_defaults(argv: Sequence[str]) -> list[str]:
    """``argv`` as given for a run of the user's own, else the example's flags followed by ``argv``.

    The example writes to ``$OUTPUT_DIR`` (default runs/tiny) and resumes from it.
    """
    if is_own_run(argv):
        return list(argv)
    prefixes = prepare_data()
    output = os.environ.get("OUTPUT_DIR", os.path.join(ROOT, "runs", "tiny"))
    return [
        "--config", CONFIG, "--data-path", prefixes["train"], "--valid-data-path", prefixes["valid"],
        *TOKENIZER, "--save", output, "--load", output, *argv,
    ]
