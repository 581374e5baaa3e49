"""The command-line entries: training (``examples/pretrain_simpo.sh``, ``examples/pretrain_simpo.py``)
and checkpoint conversion (``tools/convert_hf_checkpoint.py``)."""

from __future__ import annotations

import sys
import warnings
from typing import Sequence


def quiet_import_notices() -> None:
    """megatron-core warns at import that Apex / Transformer Engine are absent; on the CPU that
    is expected, and where they matter the run itself says so."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)


def convert(argv: Sequence[str] | None = None) -> int:
    """``tools/convert_hf_checkpoint.py import|export``; the process's exit code."""
    quiet_import_notices()
    from simpo_megatron.training.hf_checkpoint import main as convert_main

    return convert_main(argv)


def main(argv: Sequence[str] | None = None, example_defaults: bool = False) -> int:
    """Train as ``argv`` says (``sys.argv[1:]`` by default); the process's exit code.

    ``example_defaults``: flags that name no data or recipe apply on top of the tiny example
    (``bash examples/pretrain_simpo.sh --train-iters 4``).
    """
    quiet_import_notices()
    from simpo_megatron.training.loop import main as train

    argv = list(sys.argv[1:] if argv is None else argv)
    if example_defaults:
        from simpo_megatron.example import with_example_defaults

        argv = with_example_defaults(argv)
    return train(argv)
