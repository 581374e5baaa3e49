"""The per-rank entry of ``examples/pretrain_simpo.sh`` and ``examples/pretrain_simpo.py``."""

from __future__ import annotations

import sys
import warnings
from typing import Sequence


def main(argv: Sequence[str] | None = None, example_defaults: bool = False) -> int:
    """Train as ``argv`` says (``sys.argv[1:]`` by default); the process's exit code.

    ``example_defaults``: flags that name no data or recipe apply on top of the tiny example
    (``bash examples/pretrain_simpo.sh --train-iters 4``).
    """
    # megatron-core warns at import that Apex / Transformer Engine are absent; on the CPU that
    # is expected, and where they matter the run itself says so.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)
    from simpo_megatron.training.loop import main as train

    argv = list(sys.argv[1:] if argv is None else argv)
    if example_defaults:
        from simpo_megatron.example import with_example_defaults

        argv = with_example_defaults(argv)
    return train(argv)
