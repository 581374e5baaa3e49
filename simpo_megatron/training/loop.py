"""The SimPO training loop: set-up, train / evaluate / save at intervals, clean exits.

``main(argv)`` is the entry point that ``examples/pretrain_simpo.sh`` launches on every rank.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from simpo_megatron.config import ConfigError, SimPOConfig, load_config
from simpo_megatron.config.validation import validate_data
from simpo_megatron.data.provider import (
    DataMismatchError,
    DataSetup,
    TokenizerFacts,
    build_datasets,
    eval_micro_batches,
    global_batches,
    read_tokenizer,
)
from simpo_megatron.data.reference_scores import ReferenceScoresError
from simpo_megatron.hf import HFConversionError, hf_model_overrides, is_hf_checkpoint
from simpo_megatron.mathutil import ceil_div
from simpo_megatron.memory_estimate import device_budget, startup_report
from simpo_megatron.model.fp8 import FP8UnavailableError, TransformerEngineUnavailableError, check_transformer_engine
from simpo_megatron.runtime import destroy_distributed, initialize_distributed
from simpo_megatron.training.checkpointing import Checkpointer, CheckpointError
from simpo_megatron.training.collective_errors import collective_failure_message, set_phase

# TrainingError is raised by the monitor; callers catch it as loop.TrainingError.
from simpo_megatron.training.monitor import (
    MetricsProcessor,
    TrainingError,  # noqa: F401
    print_rank_last,
)
from simpo_megatron.training.reference import with_reference_scores
from simpo_megatron.training.run_control import RunControl
from simpo_megatron.training.trainer import TrainState, eval_step, setup_model_and_optimizer, train_step


def evaluate(cfg: SimPOConfig, state: TrainState, dataset, pad_id: int) -> dict | None:
    """Metrics over the validation pairs, the same pairs each time, each scored once.

    ``--eval-iters -1``: every pair of ``dataset``; ``--eval-iters N``: the first N global
    batches' worth of pairs (fewer if the data ends first). A partial last global batch counts
    (short micro-batches are padded with zero-weight pairs). Returns the pair-weighted means on
    the last pipeline stage, None elsewhere.
    """
    gbs = cfg.data.global_batch_size
    num_pairs = len(dataset) if cfg.logging.eval_iters < 0 else min(len(dataset), cfg.logging.eval_iters * gbs)
    stream = eval_micro_batches(
        dataset,
        cfg,
        pad_id,
        num_pairs,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    totals: dict[str, float] = {}
    pairs = 0
    for _ in range(ceil_div(num_pairs, gbs)):
        batches = [next(stream) for _ in range(cfg.num_micro_batches(dist.get_world_size()))]
        metrics = eval_step(cfg, state, batches)
        if metrics is None:
            continue
        n = metrics.pop("num_pairs")
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * n
        pairs += n
    if not pairs:
        return None
    return {key: value / pairs for key, value in totals.items()} | {"num_pairs": pairs}


def precision_notice(cfg: SimPOConfig, cuda_available: bool) -> str | None:
    """What to tell the user when --bf16 / --fp16 is asked for without a visible GPU (None otherwise).

    Both work on the CPU (gloo), slowly, which is what tests use; on a cluster it usually means
    CUDA_VISIBLE_DEVICES or the job's GPU request is wrong, so the run says so at start.
    """
    if cuda_available or not (cfg.model.bf16 or cfg.model.fp16):
        return None
    flag = "--bf16" if cfg.model.bf16 else "--fp16"
    return (
        f"note: no GPU is visible; {flag} runs on the CPU (gloo), slowly. "
        "If you meant to train on GPUs, check CUDA_VISIBLE_DEVICES and the job's GPU request."
    )


def _check_training_data(cfg: SimPOConfig, num_pairs: int) -> None:
    if num_pairs < cfg.data.global_batch_size:
        raise ConfigError(
            f"the training data has {num_pairs} pairs, fewer than one global batch "
            f"(--global-batch-size {cfg.data.global_batch_size}): give more data (--data-path, --split) "
            f"or a smaller --global-batch-size"
        )


def _as_config_error(build, *args):
    """``build(*args)``, a ValueError of the data (a missing prefix, a bad --split or blend, an
    unreadable dataset or tokenizer) raised as ConfigError; a tokenizer mismatch as it is."""
    try:
        return build(*args)
    except DataMismatchError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def resolve_config(cfg: SimPOConfig) -> tuple[SimPOConfig, TokenizerFacts]:
    """``cfg`` completed from the run's inputs, ready to validate, and the tokenizer's facts.

    The model's shape comes from the config.json of a Hugging Face ``--load``; the vocabulary
    size from the tokenizer when ``--vocab-size`` is not given (which must not be smaller).
    Needs no process group: the configuration is final before any work starts.
    """
    if cfg.checkpoint.load and is_hf_checkpoint(cfg.checkpoint.load):
        overrides = hf_model_overrides(cfg.checkpoint.load, seq_length=cfg.data.seq_length)
        if cfg.model.moe_aux_loss_coeff is not None:  # a training knob: the flag given wins
            overrides.pop("moe_aux_loss_coeff", None)
        cfg = cfg.replace(**overrides)
    validate_data(cfg.data)  # the data flags name a tokenizer and datasets before they are read
    tokenizer = _as_config_error(read_tokenizer, cfg)
    if cfg.model.vocab_size is None:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"--vocab-size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    return cfg, tokenizer


def pretrain(cfg: SimPOConfig) -> dict:
    """Train (or with --eval-only, evaluate) as ``cfg`` says; returns a summary on every rank.

    ``--load`` may name a Hugging Face model directory: the model shape is then taken from
    its config.json, and its weights are loaded into the model as a fresh start (a resumed run
    continues from --save instead; see ``Checkpointer.start``).
    """
    started = time.monotonic()  # --exit-duration-in-mins counts from here, set-up included
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, tokenizer = resolve_config(cfg)
    cfg.validate(world_size)
    if cfg.model.transformer_impl == "transformer_engine":
        check_transformer_engine(cfg.model)  # before any process group: fail fast, on every rank
    initialize_distributed(
        cfg.parallel_layout(), seed=cfg.optimizer.seed, timeout_minutes=cfg.parallel.distributed_timeout_minutes
    )
    notice = precision_notice(cfg, torch.cuda.is_available())
    if notice:
        print_rank_last(notice)
    if dist.get_rank() == 0:
        print(startup_report(cfg, world_size, device_budget(cfg)), flush=True)
    data = _as_config_error(build_datasets, cfg, tokenizer)
    if not cfg.logging.eval_only:
        _check_training_data(cfg, len(data.train))
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    checkpointer = Checkpointer(cfg)
    start = checkpointer.start(state)
    data = with_reference_scores(cfg, state, data, start)
    monitor = MetricsProcessor(
        cfg,
        writes=dist.get_rank() == world_size - 1,
        data_parallel_group=parallel_state.get_data_parallel_group(),
        resumed_at=None if cfg.logging.eval_only else state.iteration,
    )
    try:
        if cfg.logging.eval_only:
            if data.valid is None:
                raise ConfigError("--eval-only needs validation data (--split with a valid part, or --valid-data-path)")
            metrics = evaluate(cfg, state, data.valid, data.pad_id)
            monitor.record_eval(state.iteration, metrics)
            return {"iteration": state.iteration, "valid": metrics, "metrics_file": monitor.metrics_file}
        if state.iteration >= cfg.optimizer.train_iters:
            print_rank_last(
                f"already trained: {start.path} is at iteration {state.iteration} and --train-iters is "
                f"{cfg.optimizer.train_iters}; raise --train-iters to train on"
            )
            return {
                "iteration": state.iteration,
                "checkpoint": None,
                "metrics_file": monitor.metrics_file,
                "done": True,
            }
        return _train(cfg, state, data, checkpointer, monitor, RunControl(cfg.checkpoint, started))
    finally:
        monitor.close()


def _train(
    cfg: SimPOConfig,
    state: TrainState,
    data: DataSetup,
    checkpointer: Checkpointer,
    monitor: MetricsProcessor,
    control: RunControl,
) -> dict:
    """Train from ``state`` to ``--train-iters``, evaluating and saving at intervals, and stop
    early, with a final save, when ``control`` says so (a signal, --exit-duration-in-mins,
    --exit-interval)."""
    stream = global_batches(
        data.train,
        cfg,
        data.pad_id,
        state.consumed_samples,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    exit_reason = None
    eval_interval = cfg.logging.eval_interval if data.valid is not None else None
    last_valid = None
    try:
        if eval_interval and state.iteration == 0:  # a baseline, so the curves show where learning started
            last_valid = _evaluate_and_record(cfg, state, data, monitor)
        while state.iteration < cfg.optimizer.train_iters:
            set_phase(f"training iteration {state.iteration + 1}")
            checkpointer.finalize_async_saves()
            batches = next(stream)
            start = time.perf_counter()
            result = train_step(cfg, state, batches)
            monitor.record_step(state.iteration, state.consumed_samples, result, batches, time.perf_counter() - start)
            if eval_interval and state.iteration % eval_interval == 0:
                last_valid = _evaluate_and_record(cfg, state, data, monitor)
            checkpointer.save_if_due(state)
            exit_reason = control.check(state.iteration)
            if exit_reason and state.iteration < cfg.optimizer.train_iters:
                print_rank_last(exit_reason)
                break
            exit_reason = None
    finally:
        control.close()
    checkpoint = checkpointer.save_final(state)
    if monitor.metrics_file:
        print_rank_last(f"metrics: {monitor.metrics_file}")
    return {
        "iteration": state.iteration,
        "train": monitor.last_train,
        "valid": last_valid,
        "checkpoint": checkpoint,
        "metrics_file": monitor.metrics_file,
        "interrupted": exit_reason is not None,
        "exit_reason": exit_reason,
    }


def _evaluate_and_record(cfg: SimPOConfig, state: TrainState, data: DataSetup, monitor: MetricsProcessor):
    set_phase(f"evaluating at iteration {state.iteration}")
    metrics = evaluate(cfg, state, data.valid, data.pad_id)
    monitor.record_eval(state.iteration, metrics)
    return metrics


# What a user can fix (a flag, a file, the machine): a message and exit code 2, not a traceback.
USER_ERRORS = (
    ConfigError,
    TransformerEngineUnavailableError,
    FP8UnavailableError,
    DataMismatchError,
    CheckpointError,
    HFConversionError,
    ReferenceScoresError,
)


def run_entry(body: Callable[[SimPOConfig], object], argv: list[str] | None = None) -> int:
    """Parse flags (and --config), run ``body(cfg)``, and tear down; exit code 2 for a user error,
    1 with a message naming the rank and the collective for a collective that failed (a rank
    hung past --distributed-timeout-minutes, or died)."""
    try:
        body(load_config(argv))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        message = collective_failure_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train (``pretrain``) as the flags say; the process's exit code."""
    return run_entry(pretrain, argv)
