"""The command-line entries, installed as console scripts and run by the checkout's scripts:

- ``simpo-train`` (``main``): training, run on every rank; ``examples/pretrain_simpo.py`` is the
  same entry and ``examples/pretrain_simpo.sh`` the torchrun launcher around it;
- ``simpo-preprocess`` (``preprocess``): preference pairs to an indexed dataset,
  ``tools/preprocess_preference_data.py``;
- ``simpo-score-reference`` (``score_reference``): the reference model's scores for a
  reference-based loss (DPO, IPO, ...), computed ahead of training;
- ``simpo-convert`` (``convert``): checkpoint conversion between Hugging Face and Megatron,
  ``tools/convert_hf_checkpoint.py``.

Each imports what it needs only when called, so ``--help`` of the data tool loads no megatron-core.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence


def quiet_import_notices() -> None:
    """megatron-core warns at import that Apex / Transformer Engine are absent; on the CPU that
    is expected, and where they matter the run itself says so."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)


def preprocess(argv: Sequence[str] | None = None) -> int:
    """``simpo-preprocess`` (``sys.argv[1:]`` by default); the process's exit code."""
    from simpo_megatron.data.preprocess import command

    return command(argv)


def convert(argv: Sequence[str] | None = None) -> int:
    """``simpo-convert import|export``; the process's exit code."""
    quiet_import_notices()
    from simpo_megatron.training.hf_checkpoint import main as convert_main

    return convert_main(argv)


def score_reference(argv: Sequence[str] | None = None) -> int:
    """``simpo-score-reference``: the reference model's scores of a run's datasets, ahead of
    training (run on every rank, like training, with the training run's flags)."""
    quiet_import_notices()
    from simpo_megatron.training.reference import main as score

    return score(argv)


def main(argv: Sequence[str] | None = None, example_root: str | None = None) -> int:
    """``simpo-train``: train as ``argv`` says (``sys.argv[1:]`` by default); the process's exit code.

    ``example_root``: the checkout whose tiny example (examples/) applies under flags that name
    no data or recipe (``bash examples/pretrain_simpo.sh --train-iters 4``).
    """
    quiet_import_notices()
    from simpo_megatron.training.loop import main as train

    argv = list(sys.argv[1:] if argv is None else argv)
    if example_root is not None:
        from simpo_megatron.example import with_example_defaults

        argv = with_example_defaults(argv, example_root)
    return train(argv)
