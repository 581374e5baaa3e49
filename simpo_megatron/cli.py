"""The command-line entries, installed as console scripts and run by the checkout's scripts:

- ``simpo-train`` (``main``): training, run on every rank; ``examples/pretrain_simpo.py`` is the
  same entry and ``examples/pretrain_simpo.sh`` the torchrun launcher around it;
- ``simpo-preprocess`` (``preprocess``): preference pairs to an indexed dataset,
  ``tools/preprocess_preference_data.py``;
- ``simpo-score-reference`` (``score_reference``): the reference model's scores for a
  reference-based loss (DPO, IPO, ...), computed ahead of training;
- ``simpo-convert`` (``convert``): checkpoint conversion between Hugging Face and Megatron,
  ``tools/convert_hf_checkpoint.py``;
- ``simpo-estimate-memory`` (``estimate_memory``): the per-GPU memory estimate of a run, from
  the training flags / YAML and ``--world-size``, without a GPU or weights.

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


def estimate_memory(argv: Sequence[str] | None = None) -> int:
    """``simpo-estimate-memory --world-size N [training flags]``: print the memory estimate of the
    run (and the flags that would make it fit --gpu-memory-gb); the process's exit code."""
    import argparse

    quiet_import_notices()
    from simpo_megatron.config import ConfigError, load_config
    from simpo_megatron.memory_estimate import device_budget, startup_report

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--world-size", type=int, default=None)
    known, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if "-h" in rest or "--help" in rest:
        print("usage: simpo-estimate-memory [--world-size N] [--config FILE.yaml] [training flags]")
        print("  --world-size N  GPUs of the run (default: the smallest the layout runs on: TP x PP x CP,")
        print("                  with as many data-parallel ranks as EP needs)")
        return 0
    try:
        cfg = load_config(rest)
        if not cfg.data.data_path and not cfg.data.mock_data:
            # The data does not change the estimate, and is not read: a name stands in for it.
            cfg = cfg.replace(**({"data_path": ["DATA"]} if cfg.data.tokenizer_model else {"mock_data": True}))
        if cfg.model.vocab_size is None or cfg.checkpoint.load:
            from simpo_megatron.training.loop import resolve_config

            cfg, _ = resolve_config(cfg)  # the vocabulary (tokenizer) and an HF --load's shape
        world_size = known.world_size or _smallest_world(cfg.parallel)
        cfg.validate(world_size)
        print(startup_report(cfg, world_size, device_budget(cfg)))
    except (ConfigError, OSError) as e:  # a bad flag, a missing --config file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _smallest_world(par) -> int:
    """TP x PP x CP, with the data-parallel ranks EP takes its ranks from (EP divides DP x CP)."""
    import math

    ep, cp = par.expert_model_parallel_size, par.context_parallel_size
    return par.model_parallel_size * (ep // math.gcd(ep, cp))


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
