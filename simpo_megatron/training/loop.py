"""The SimPO training loop: set-up, train / evaluate / save at intervals, clean exits.

``main(argv)`` is the entry point that ``examples/pretrain_simpo.sh`` launches on every rank.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from simpo_megatron.config import ConfigError, SimPOConfig, load_config
from simpo_megatron.data.provider import DataMismatchError, build_datasets, eval_micro_batches, global_batches
from simpo_megatron.model.fp8 import FP8UnavailableError, TransformerEngineUnavailableError, check_transformer_engine
from simpo_megatron.hf import HFConversionError, hf_model_overrides, is_hf_checkpoint, load_hf_weights, save_hf_config
from simpo_megatron.runtime import destroy_distributed, initialize_distributed
from simpo_megatron.training.checkpointing import CheckpointError, config_to_dict, load_checkpoint, read_tracker, save_checkpoint
from simpo_megatron.training.monitor import (
    HealthMonitor,
    LogWindow,
    MetricsWriter,
    format_eval_line,
    format_train_line,
    print_rank_last,
)
from simpo_megatron.training.trainer import TrainState, eval_step, setup_model_and_optimizer, train_step


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates)."""


class _ExitSignal:
    """Records SIGTERM / SIGINT so that every rank stops at the same iteration boundary."""

    def __init__(self):
        self.received = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _global_tokens(batches: list[dict]) -> tuple[int, int]:
    """Real tokens (prompt + response, no padding) and token slots (with padding) in the
    global batch, over data-parallel ranks."""
    count = torch.tensor(
        [sum(b["num_tokens"] for b in batches), sum(b["tokens"].numel() for b in batches)], dtype=torch.float64
    )
    if torch.cuda.is_available():
        count = count.cuda()
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count[0].item()), int(count[1].item())


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
        dataset, cfg, pad_id, num_pairs,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
    totals: dict[str, float] = {}
    pairs = 0
    for _ in range(-(-num_pairs // gbs)):
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


def _resolve_vocab(cfg: SimPOConfig, data_vocab: int) -> SimPOConfig:
    if cfg.model.vocab_size is None:
        return cfg.replace(vocab_size=data_vocab)
    if cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"--vocab-size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({data_vocab})")
    return cfg


def pretrain(cfg: SimPOConfig) -> dict:
    """Train (or with --eval-only, evaluate) as ``cfg`` says; returns a summary on every rank.

    ``--load`` may name a Hugging Face model directory: the model shape is then taken from
    its config.json, and its weights are loaded into the model as a fresh start (a resumed run
    continues from --save instead).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.checkpoint.load and is_hf_checkpoint(cfg.checkpoint.load):
        cfg = cfg.replace(**hf_model_overrides(cfg.checkpoint.load, seq_length=cfg.data.seq_length))
    cfg.validate(world_size)
    if cfg.model.transformer_impl == "transformer_engine":
        check_transformer_engine(cfg.model)  # before any process group: fail fast, on every rank
    initialize_distributed(
        cfg.parallel_layout(),
        seed=cfg.optimizer.seed,
    )
    notice = precision_notice(cfg, torch.cuda.is_available())
    if notice:
        print_rank_last(notice)
    try:
        data = build_datasets(cfg)
    except DataMismatchError:
        raise
    except ValueError as e:  # a missing prefix, a bad --split or blend, an unreadable dataset
        raise ConfigError(str(e)) from e
    if not cfg.logging.eval_only:
        _check_training_data(cfg, len(data.train))
    cfg = _resolve_vocab(cfg, data.vocab_size)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    if cfg.checkpoint.load and is_hf_checkpoint(cfg.checkpoint.load):
        if cfg.checkpoint.save and read_tracker(cfg.checkpoint.save) is not None:
            # Resume a run that started from the HF model, rather than start it again.
            cfg = cfg.replace(load=cfg.checkpoint.save)
        else:
            load_hf_weights(cfg.checkpoint.load, state.model, cfg)
            state.optimizer.reload_model_params()  # mixed-precision optimizers' fp32 copies
            if cfg.checkpoint.save and dist.get_rank() == 0:
                save_hf_config(cfg.checkpoint.load, cfg.checkpoint.save)  # export's default config and tokenizer
            print_rank_last(f"loaded the Hugging Face model {cfg.checkpoint.load}")
            cfg = cfg.replace(load=None)
    if cfg.checkpoint.load and read_tracker(cfg.checkpoint.load) is None:
        # As Megatron-LM: --load on a directory without a checkpoint starts from scratch
        # (so --save and --load can name the same directory from the first run on).
        print_rank_last(f"no checkpoint in --load {cfg.checkpoint.load}: training from scratch")
    elif cfg.checkpoint.load:
        load_checkpoint(
            cfg.checkpoint.load, state, load_optim=not cfg.checkpoint.no_load_optim, load_rng=not cfg.checkpoint.no_load_rng,
            finetune=cfg.checkpoint.finetune,
        )
        print_rank_last(f"loaded {cfg.checkpoint.load} at iteration {state.iteration}")

    is_last_rank = dist.get_rank() == world_size - 1
    metrics_file = cfg.logging.metrics_file or (os.path.join(cfg.checkpoint.save, "metrics.jsonl") if cfg.checkpoint.save else None)
    writer = MetricsWriter(metrics_file, cfg.logging.tensorboard_dir) if is_last_rank else None
    try:
        if cfg.logging.eval_only:
            if data.valid is None:
                raise ConfigError("--eval-only needs validation data (--split with a valid part, or --valid-data-path)")
            metrics = evaluate(cfg, state, data.valid, data.pad_id)
            if writer is not None:
                writer.write("valid", state.iteration, metrics)
                print_rank_last(format_eval_line(state.iteration, metrics))
            return {"iteration": state.iteration, "valid": metrics, "metrics_file": metrics_file}
        if state.iteration >= cfg.optimizer.train_iters:
            print_rank_last(
                f"already trained: {cfg.checkpoint.load} is at iteration {state.iteration} and --train-iters is "
                f"{cfg.optimizer.train_iters}; raise --train-iters to train on"
            )
            return {"iteration": state.iteration, "checkpoint": None, "metrics_file": metrics_file, "done": True}
        return _train(cfg, state, data, writer, metrics_file)
    finally:
        if writer is not None:
            writer.close()


def _train(cfg: SimPOConfig, state: TrainState, data, writer: MetricsWriter | None, metrics_file) -> dict:
    stream = global_batches(
        data.train, cfg, data.pad_id, state.consumed_samples,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
    exit_signal = _ExitSignal()
    config_dict = config_to_dict(cfg)
    consecutive_skips = 0
    window = {"time": 0.0, "tokens": 0, "slots": 0, "pairs": 0, "iters": 0}
    log_window = LogWindow()
    health = HealthMonitor(cfg.logging.health_check_window, cfg.loss.average_log_prob)
    last_train, last_valid, interrupted = None, None, False
    if cfg.logging.eval_interval and data.valid is not None and state.iteration == 0:
        # A baseline before the first update, so the curves show where learning started.
        last_valid = evaluate(cfg, state, data.valid, data.pad_id)
        if writer is not None and last_valid is not None:
            writer.write("valid", 0, last_valid)
            print_rank_last(format_eval_line(0, last_valid))
    try:
        while state.iteration < cfg.optimizer.train_iters:
            batches = next(stream)
            start = time.perf_counter()
            result = train_step(cfg, state, batches)
            elapsed = time.perf_counter() - start
            tokens, slots = _global_tokens(batches)
            window["time"] += elapsed
            window["tokens"] += tokens
            window["slots"] += slots
            window["pairs"] += cfg.data.global_batch_size
            window["iters"] += 1

            consecutive_skips = consecutive_skips + 1 if result["skipped"] else 0
            if result["skipped"]:
                reason = "loss-scale overflow or non-finite gradient" if cfg.model.fp16 else "non-finite loss or gradient"
                print_rank_last(
                    f" iteration {state.iteration}: {reason}, update skipped "
                    f"({consecutive_skips} in a row, limit --max-skipped-iters {cfg.optimizer.max_skipped_iters})"
                )
            if consecutive_skips >= cfg.optimizer.max_skipped_iters:
                raise TrainingError(
                    f"{consecutive_skips} consecutive iterations had a non-finite loss or gradient "
                    f"(--max-skipped-iters {cfg.optimizer.max_skipped_iters}); stopping at iteration {state.iteration}"
                )

            if result["metrics"] is not None:
                last_train = {
                    **result["metrics"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "skipped": result["skipped"],
                    "consumed_samples": state.consumed_samples,
                }
                log_window.add(result["metrics"], skipped=result["skipped"])
                if writer is not None:
                    writer.write("train", state.iteration, last_train)
            if state.iteration % cfg.logging.log_interval == 0 and last_train is not None:
                averaged = log_window.means()
                log_window.reset()
                for warning in health.update(averaged):
                    print_rank_last(f" WARNING at iteration {state.iteration}: {warning['message']}")
                    if writer is not None:
                        writer.write("warning", state.iteration, warning)
                throughput = {
                    "tokens_per_s": window["tokens"] / window["time"],  # real tokens, no padding
                    "packing_efficiency": window["tokens"] / window["slots"],
                    "pairs_per_s": window["pairs"] / window["time"],
                    "ms_per_iter": 1000 * window["time"] / window["iters"],
                    "skipped_iters": consecutive_skips,
                }
                if writer is not None:
                    writer.write("throughput", state.iteration, throughput)
                line = {**last_train, **averaged, **throughput}
                print_rank_last(format_train_line(state.iteration, cfg.optimizer.train_iters, line))
                window = {"time": 0.0, "tokens": 0, "slots": 0, "pairs": 0, "iters": 0}

            if cfg.logging.eval_interval and data.valid is not None and state.iteration % cfg.logging.eval_interval == 0:
                last_valid = evaluate(cfg, state, data.valid, data.pad_id)
                if writer is not None and last_valid is not None:
                    writer.write("valid", state.iteration, last_valid)
                    print_rank_last(format_eval_line(state.iteration, last_valid))

            if cfg.checkpoint.save and cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
                save_checkpoint(cfg.checkpoint.save, state, config_dict, optim_fully_reshardable=cfg.checkpoint.dist_ckpt_optim_fully_reshardable)
            if exit_signal.any_rank():
                interrupted = True
                print_rank_last(f"exit signal received at iteration {state.iteration}")
                break
    finally:
        exit_signal.restore()

    checkpoint = None
    if cfg.checkpoint.save:
        checkpoint = save_checkpoint(
            cfg.checkpoint.save, state, config_dict, optim_fully_reshardable=cfg.checkpoint.dist_ckpt_optim_fully_reshardable
        )
        print_rank_last(f"saved checkpoint {checkpoint}")
    if metrics_file:
        print_rank_last(f"metrics: {metrics_file}")
    return {
        "iteration": state.iteration,
        "train": last_train,
        "valid": last_valid,
        "checkpoint": checkpoint,
        "metrics_file": metrics_file,
        "interrupted": interrupted,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags (and --config), run, and tear down; exit code 2 for a configuration error."""
    try:
        cfg = load_config(argv)
        pretrain(cfg)
    except (ConfigError, TransformerEngineUnavailableError, FP8UnavailableError, DataMismatchError, CheckpointError,
            HFConversionError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            destroy_distributed()
    return 0
