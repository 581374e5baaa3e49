"""The reference model's scores of every pair, computed once by our own forward, for reference-based losses.

DPO, IPO and length-normalized DPO compare the policy with a fixed reference model. Its log-probs
do not change during training, so they are computed once, before the first step, by a
forward-only pass of this run's model (any TP/PP/CP/DP layout, packed or not, the chunked head,
the run's precision) with the run's truncation, and stored per data prefix
(``data/reference_scores.py``: keyed by the data, the reference weights, the truncation, the
tokenizer and the precision). A step never runs a reference forward: each sample carries its
pair's scores. A resumed run, or a later run on the same data and reference, reads the stored
scores; a stored file of another key is never used (the pass scores afresh and says why).

The reference is ``--ref-load`` when given, else the weights ``--load`` starts from (an HF
directory or a checkpoint), as TRL's ``precompute_ref_log_probs``. When the model does not hold
those weights (a resumed run, or ``--ref-load``), they are loaded for the pass and the model's
own weights are put back after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from simpo_megatron.config import SimPOConfig
from simpo_megatron.data.batch import BatchLayout, collate
from simpo_megatron.data.packing import pack_first_fit, pair_tokens
from simpo_megatron.data.pair_dataset import PreferencePairDataset
from simpo_megatron.data.provider import DataSetup, _cp_chunks, pad_multiple
from simpo_megatron.data.reference_scores import (
    WithReferenceScores,
    default_directory,
    find_reference_scores,
    pair_datasets,
    read_reference_scores,
    reference_key,
    scores_path,
    stale_files,
    write_reference_scores,
)
from simpo_megatron.hf import is_hf_checkpoint, load_hf_weights
from simpo_megatron.losses import get_loss
from simpo_megatron.mathutil import ceil_div
from simpo_megatron.training.checkpointing import Start, load_checkpoint
from simpo_megatron.training.monitor import print_rank_last
from simpo_megatron.training.trainer import run_schedule


def precision(cfg: SimPOConfig) -> str:
    return "bf16" if cfg.model.bf16 else "fp16" if cfg.model.fp16 else "fp32"


def reference_weights(cfg: SimPOConfig, start: Start | None = None) -> str:
    """The reference model's weights: ``--ref-load``; else the weights the run's first iteration
    started from (recorded in a resumed run's checkpoint; at iteration 0 those just loaded, a
    checkpoint by its iteration directory); else what ``--load`` names."""
    started = None if start is None else start.reference if start.iteration > 0 else start.weights
    return cfg.checkpoint.ref_load or started or cfg.checkpoint.load


def with_reference_scores(cfg: SimPOConfig, state, data: DataSetup, start: Start) -> DataSetup:
    """``data`` whose samples carry their pair's reference scores, scoring the prefixes that
    have none stored yet; ``data`` itself for a reference-free loss."""
    if not get_loss(cfg.loss.loss_type).needs_reference:
        return data
    datasets = pair_datasets(data.train) + (pair_datasets(data.valid) if data.valid is not None else [])
    prefixes = list(dict.fromkeys(os.path.abspath(d.prefix) for d in datasets))
    weights = reference_weights(cfg, start)
    tables, missing = {}, []
    for prefix in prefixes:
        key = reference_key(prefix, weights, cfg.data.seq_length, cfg.data.max_prompt_length, precision(cfg))
        directory = cfg.checkpoint.ref_scores_dir or default_directory(prefix)
        path = find_reference_scores(directory, prefix, key)
        if path is None:
            missing.append((prefix, key, directory))
        else:
            tables[prefix] = read_reference_scores(path, key)
            print_rank_last(f"reference scores of {prefix}: {path}")
    if missing:
        # The model holds the reference when the run starts from those very weights.
        holds_reference = start.iteration == 0 and start.weights is not None and start.weights == weights
        with contextlib.nullcontext() if holds_reference else reference_loaded(cfg, state, weights):
            for prefix, key, directory in missing:
                for stale, why in stale_files(directory, prefix, key):
                    print_rank_last(f"not reusing {stale}: {why}")
                path = scores_path(directory, prefix, key)
                print_rank_last(f"scoring {prefix} with the reference model {weights} (once; kept in {path})")
                score_prefix(cfg, state, prefix, data.pad_id, key, path, weights)
                tables[prefix] = read_reference_scores(path, key)
    return dataclasses.replace(
        data,
        train=WithReferenceScores(data.train, tables),
        valid=None if data.valid is None else WithReferenceScores(data.valid, tables),
    )


@contextlib.contextmanager
def reference_loaded(cfg: SimPOConfig, state, weights: str):
    """The model holds the reference ``weights`` inside the block, its own weights after it.

    The optimizer's (fp32 main) copies are not touched, so nothing but the model's parameters
    changes and they are restored exactly.
    """
    saved = [p.detach().clone() for m in state.model for p in m.parameters()]
    try:
        load_reference(cfg, state, weights)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip((p for m in state.model for p in m.parameters()), saved, strict=True):
                p.copy_(value)


def load_reference(cfg: SimPOConfig, state, weights: str) -> None:
    """Load the weights (an HF directory or a checkpoint) into the model, nothing else."""
    if is_hf_checkpoint(weights):
        load_hf_weights(weights, state.model, cfg)
        return
    iteration, consumed = state.iteration, state.consumed_samples
    load_checkpoint(weights, state, load_optim=False, load_rng=False, finetune=True)
    state.iteration, state.consumed_samples = iteration, consumed


def scoring_order(samples) -> list[int]:
    """Indices of ``samples`` by their longer sequence (prompt + longer response), longest first;
    ties in index order."""
    longest = [len(s["prompt"]) + max(len(s["chosen"]), len(s["rejected"])) for s in samples]
    return sorted(range(len(samples)), key=lambda i: (-longest[i], i))


def scores_packed(cfg: SimPOConfig) -> bool:
    """Whether the reference pass packs its micro-batches: when the run packs, and always on the
    local layers, whose attention runs a packed (THD) row whatever the run's own layout. A pair's
    scores are per-sequence sums, the same packed or padded up to fp32 rounding; packed, the pass
    spends nothing on padding."""
    return cfg.data.packing or cfg.model.transformer_impl == "local"


def _micro_batches(cfg: SimPOConfig, dataset, pairs: range, pad_id: int):
    """This rank's pairs as ``(micro-batch, pair indices)``: packed rows of up to
    ``2 x --micro-batch-size x --seq-length`` tokens (``scores_packed``), else padded micro-batches.

    A pair's scores do not depend on its micro-batch's other pairs, so padded micro-batches take
    the pairs longest first (``scoring_order``): each is padded to about its own pairs' length.
    """
    samples = [dataset[i] for i in pairs]
    mbs = cfg.data.micro_batch_size
    if not scores_packed(cfg):
        layout = BatchLayout(pad_id, cfg.data.seq_length, pad_multiple(cfg), pairs=mbs, filler=dataset[0])
        order = scoring_order(samples)
        for begin in range(0, len(order), mbs):
            group = order[begin : begin + mbs]
            yield collate([samples[i] for i in group], layout), [pairs[i] for i in group]
        return
    chunks = _cp_chunks(cfg)
    # A row's width splits over CP chunks (and TP ranks under sequence parallelism) as a padded one.
    par = cfg.parallel
    multiple = pad_multiple(cfg) or chunks * (par.tensor_model_parallel_size if par.sequence_parallel else 1)
    layout = BatchLayout(pad_id, pad_to_multiple_of=multiple, packed=True, sequence_multiple_of=chunks)
    sizes = [pair_tokens(s, chunks) for s in samples]
    for bin_ in pack_first_fit(sizes, 2 * mbs * cfg.data.seq_length):
        yield collate([samples[i] for i in bin_], layout), [pairs[i] for i in bin_]


def score_dataset(cfg: SimPOConfig, state, dataset, pad_id: int) -> np.ndarray | None:
    """``[len(dataset), 4]`` scores (chosen and rejected summed log-probs, their token counts)
    of every pair, on the last pipeline stage's ranks; None elsewhere. Data-parallel ranks
    split the pairs; a collective over the world."""
    for m in state.model:
        m.eval()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = ceil_div(len(dataset), dp)
    mine = range(rank * share, min(len(dataset), (rank + 1) * share))
    rows = np.full((share, 4), np.nan)
    step = 4 * parallel_state.get_pipeline_model_parallel_world_size()  # micro-batches per schedule call
    stream = _micro_batches(cfg, dataset, mine, pad_id)
    while group := [b for _, b in zip(range(step), stream)]:
        with torch.no_grad():
            outputs = run_schedule(cfg, state.model, [b for b, _ in group], forward_only=True, scoring=True)
        for out, (_, indices) in zip(outputs, group):
            rows[[i - rank * share for i in indices]] = out["scores"][: len(indices)].cpu().numpy()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = torch.from_numpy(rows)
    if torch.cuda.is_available():
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(dp)]
    dist.all_gather(gathered, local, group=parallel_state.get_data_parallel_group())
    return torch.cat(gathered).cpu().numpy()[: len(dataset)]


def score_prefix(cfg: SimPOConfig, state, prefix: str, pad_id: int, key, path: str, weights: str) -> None:
    """Score every pair of ``prefix`` (truncated as the run truncates) and write ``path``; all ranks
    return once the file is complete."""
    dataset = PreferencePairDataset(prefix, cfg.data.seq_length, cfg.data.max_prompt_length)
    scores = score_dataset(cfg, state, dataset, pad_id)
    writer = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )
    if writer:
        if not np.isfinite(scores).all():
            raise RuntimeError(f"the reference pass over {prefix} left pairs unscored")
        write_reference_scores(
            path,
            key,
            scores[:, 0],
            scores[:, 1],
            scores[:, 2].round().astype(np.int64),
            scores[:, 3].round().astype(np.int64),
            provenance={"prefix": prefix, "weights": weights},
        )
    dist.barrier()


def score_ahead(cfg: SimPOConfig) -> None:
    """Score the datasets of a run's configuration, on this layout, without training: the
    training run (same data, reference, truncation and precision) then reads the scores."""
    from simpo_megatron.config import ConfigError
    from simpo_megatron.data.provider import build_datasets
    from simpo_megatron.runtime import initialize_distributed
    from simpo_megatron.training.loop import resolve_config
    from simpo_megatron.training.trainer import setup_model_and_optimizer

    cfg, tokenizer = resolve_config(cfg)
    if not get_loss(cfg.loss.loss_type).needs_reference:
        raise ConfigError(f"--loss-type {cfg.loss.loss_type} uses no reference model: nothing to score")
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    initialize_distributed(cfg.parallel_layout(), seed=cfg.optimizer.seed)
    data = build_datasets(cfg, tokenizer)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    weights = reference_weights(cfg)
    load_reference(cfg, state, weights)
    with_reference_scores(cfg, state, data, Start("reference", weights, weights=weights))


def main(argv: list[str] | None = None) -> int:
    """``simpo-score-reference`` (see ``cli``): the process's exit code."""
    from simpo_megatron.training.loop import run_entry

    return run_entry(score_ahead, argv)
