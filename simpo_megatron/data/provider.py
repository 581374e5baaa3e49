"""What training asks of the data: the datasets of a run and its stream of micro-batches.

``read_tokenizer(cfg)`` gives the vocabulary size and pad id of the run's data (building the
tokenizer and checking each prefix's sidecar against it; no process group needed, so the
configuration can be completed before it is validated). ``build_datasets(cfg)`` opens the
preprocessed prefixes of ``--data-path`` (or the synthetic pairs of ``--mock-data``) and
splits train/valid. ``micro_batches(...)`` yields ``MicroBatch``es for one data-parallel rank,
resuming exactly from a consumed-samples count; ``global_batches(...)`` groups them (or packs
them) per global batch; ``eval_micro_batches(...)`` reads the validation pairs once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from simpo_megatron.data.batch import BatchLayout, MicroBatch, collate
from simpo_megatron.data.blended import build_pair_datasets, parse_data_path
from simpo_megatron.data.mock import MockPairDataset
from simpo_megatron.data.sampler import OnePassBatchSampler, PairBatchSampler

_MOCK_PAIRS = {"train": 4096, "valid": 256}
_MOCK_VOCAB = 256  # --mock-data's vocabulary without --vocab-size


@dataclass(frozen=True)
class TokenizerFacts:
    """What the model and the collate need to know of the run's tokenizer."""

    vocab_size: int
    pad_id: int


@dataclass
class DataSetup:
    """The datasets of a run, and what the model needs to know of the tokenizer."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    vocab_size: int
    pad_id: int


class DataMismatchError(ValueError):
    """A preprocessed dataset that was written with another tokenizer than the run's."""


def _check_sidecars(prefixes: list[str], tokenizer) -> None:
    """Every prefix was written by the run's tokenizer (`same_tokenizer`, as merging datasets checks)."""
    from simpo_megatron.data.builder import read_sidecar
    from simpo_megatron.data.tokenizers import same_tokenizer

    mine = tokenizer.describe()
    for prefix in prefixes:
        theirs = read_sidecar(prefix)["tokenizer"]
        key = same_tokenizer(theirs, mine)
        if key is not None:
            raise DataMismatchError(
                f"{prefix} was preprocessed with tokenizer {theirs.get('model')!r} "
                f"({key}={theirs.get(key)!r}), but --tokenizer-model {tokenizer.model!r} has "
                f"{key}={mine.get(key)!r}: preprocess again or pass the matching tokenizer"
            )


def read_tokenizer(cfg) -> TokenizerFacts:
    """The vocabulary size and pad id of ``cfg``'s data; every prefix's sidecar is checked
    against the tokenizer (``DataMismatchError``). ``--mock-data`` has no tokenizer: its
    vocabulary is ``--vocab-size`` (256 without it)."""
    if cfg.data.mock_data:
        return TokenizerFacts(cfg.model.vocab_size or _MOCK_VOCAB, MockPairDataset.pad_id)
    from simpo_megatron.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    prefixes = parse_data_path(cfg.data.data_path)[0]
    if cfg.data.valid_data_path:
        prefixes += parse_data_path(cfg.data.valid_data_path)[0]
    _check_sidecars(prefixes, tokenizer)
    return TokenizerFacts(tokenizer.vocab_size, tokenizer.pad_id)


def build_datasets(cfg, tokenizer: TokenizerFacts | None = None) -> DataSetup:
    """The train and valid datasets of ``cfg`` and the tokenizer facts the model needs
    (``tokenizer``: what ``read_tokenizer(cfg)`` returned, read again when not given)."""
    tokenizer = tokenizer or read_tokenizer(cfg)
    if cfg.data.mock_data:
        vocab = tokenizer.vocab_size
        return DataSetup(
            train=MockPairDataset(_MOCK_PAIRS["train"], vocab, cfg.data.seq_length, seed=cfg.optimizer.seed),
            valid=MockPairDataset(_MOCK_PAIRS["valid"], vocab, cfg.data.seq_length, seed=cfg.optimizer.seed + 1),
            vocab_size=vocab,
            pad_id=tokenizer.pad_id,
        )
    train, valid = build_pair_datasets(
        cfg.data.data_path,
        cfg.data.split,
        cfg.data.valid_data_path or None,
        cfg.data.seq_length,
        cfg.data.max_prompt_length,
        cfg.optimizer.seed,
        train_samples=cfg.optimizer.train_iters * cfg.data.global_batch_size,
        valid_samples=None,
    )
    return DataSetup(train=train, valid=valid, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)


def pad_multiple(cfg) -> int | None:
    """The multiple micro-batch widths are rounded up to; None pads to ``--seq-length``.

    With context parallelism the width must split into 2 x CP equal chunks, and with sequence
    parallelism each CP rank's part evenly over the TP ranks (``--seq-length`` itself is checked
    for both at start).
    """
    data, par = cfg.data, cfg.parallel
    if not data.pad_to_multiple_of:
        return None
    need = _cp_chunks(cfg) * (par.tensor_model_parallel_size if par.sequence_parallel else 1)
    return math.lcm(data.pad_to_multiple_of, need)


def _cp_chunks(cfg) -> int:
    """The equal chunks context parallelism splits each sequence into: 2 x CP (1 without CP)."""
    cp = cfg.parallel.context_parallel_size
    return 2 * cp if cp > 1 else 1


def micro_batches(
    dataset,
    cfg,
    pad_id: int,
    consumed_samples: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    shuffle: bool = True,
) -> Iterator[MicroBatch]:
    """Endless micro-batches of ``cfg.data.micro_batch_size`` pairs for one DP rank.

    Each micro-batch is padded to its longest sequence rounded up to ``--pad-to-multiple-of``
    (to ``--seq-length`` when 0); pipeline stages exchange the varying shapes
    (``variable_seq_lengths``).
    """
    layout = BatchLayout(pad_id, seq_length=cfg.data.seq_length, pad_to_multiple_of=pad_multiple(cfg))
    return _sampled(
        dataset,
        cfg,
        consumed_samples,
        cfg.data.micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        shuffle,
        partial(collate, layout=layout),
    )


def _sampled(dataset, cfg, consumed_samples, batch_size, data_parallel_rank, data_parallel_size, shuffle, collate_fn):
    """Batches of ``batch_size`` pairs for one DP rank from ``PairBatchSampler``, through a DataLoader."""
    sampler = PairBatchSampler(
        total_pairs=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=batch_size,
        global_batch_size=cfg.data.global_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        shuffle=shuffle,
        seed=cfg.optimizer.seed,
    )
    return _loaded(dataset, sampler, collate_fn, cfg, persistent=True)


def _loaded(dataset, sampler, collate_fn, cfg, persistent: bool) -> Iterator:
    """The batches of ``sampler``, collated, through a DataLoader with ``--num-workers`` workers.

    Its own generator: a DataLoader iterator draws its workers' base seed when it starts, and
    from torch's default generator that draw would shift the dropout masks of the steps after
    it (a resumed run starts its loader later than the uninterrupted one; an evaluation starts
    one mid-run).
    """
    workers = cfg.data.num_workers
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            generator=torch.Generator().manual_seed(cfg.optimizer.seed),
        )
    )


def global_batches(
    dataset,
    cfg,
    pad_id: int,
    consumed_samples: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    shuffle: bool = True,
) -> Iterator[list[MicroBatch]]:
    """Endless steps: this DP rank's list of micro-batches for each global batch.

    Unpacked, ``--global-batch-size / (--micro-batch-size x DP)`` collated micro-batches. With
    ``--packing``, the global batch's pairs packed by ``simpo_megatron.data.packing`` (every
    rank reads the whole global batch to plan the same balanced split); the number of
    micro-batches then varies from step to step, equal on every rank.
    """
    if not cfg.data.packing:
        stream = micro_batches(dataset, cfg, pad_id, consumed_samples, data_parallel_rank, data_parallel_size, shuffle)
        count = cfg.data.global_batch_size // (cfg.data.micro_batch_size * data_parallel_size)
        while True:
            yield [next(stream) for _ in range(count)]
    from simpo_megatron.data.packing import packed_micro_batches

    # Every rank reads the whole global batch (one "micro-batch" of all its pairs, as DP rank 0 of 1).
    loader = _sampled(dataset, cfg, consumed_samples, cfg.data.global_batch_size, 0, 1, shuffle, list)
    interleaved = cfg.virtual_pipeline_model_parallel_size() is not None
    for samples in loader:
        yield packed_micro_batches(
            samples,
            budget=2 * cfg.data.micro_batch_size * cfg.data.seq_length,
            data_parallel_rank=data_parallel_rank,
            data_parallel_size=data_parallel_size,
            pad_id=pad_id,
            pad_to_multiple_of=pad_multiple(cfg),
            # The interleaved schedule needs a multiple of the pipeline size.
            count_multiple_of=cfg.parallel.pipeline_model_parallel_size if interleaved else 1,
            # Context parallelism splits every packed sequence into 2 x CP chunks of its own.
            sequence_multiple_of=_cp_chunks(cfg),
        )


def eval_micro_batches(
    dataset, cfg, pad_id: int, num_pairs: int, data_parallel_rank: int, data_parallel_size: int
) -> Iterator[MicroBatch]:
    """Pairs ``[0, num_pairs)`` of ``dataset`` exactly once, as this rank's micro-batches.

    ``ceil(num_pairs / global_batch_size)`` global batches, the last one possibly partial;
    each rank yields the same number of micro-batches of ``--micro-batch-size`` pairs, short
    (or empty) ones topped up with copies of the first pair: their zero ``pair_weights`` keep
    the copies out of every sum and count, and ``num_pairs`` / ``num_tokens`` count the real
    pairs only.
    """
    sampler = OnePassBatchSampler(
        num_pairs, cfg.data.micro_batch_size, cfg.data.global_batch_size, data_parallel_rank, data_parallel_size
    )
    layout = BatchLayout(
        pad_id,
        seq_length=cfg.data.seq_length,
        pad_to_multiple_of=pad_multiple(cfg),
        pairs=cfg.data.micro_batch_size,
        filler=dataset[0],
    )
    return _loaded(dataset, sampler, partial(collate, layout=layout), cfg, persistent=False)
