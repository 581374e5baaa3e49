"""Several pair datasets blended by weight, and the train/valid datasets built from data paths.

Follows Megatron-LM's conventions: `--data-path A` or `--data-path 0.7 A 0.3 B` (weights are
normalized; without weights, several prefixes are blended in proportion to their sizes), and
`--split 98,2,0` cuts each prefix into contiguous train/valid/test ranges of its pairs.
"""

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.utils import get_blend_from_list, normalize

from simpo_megatron.data.pair_dataset import PairSample, PreferencePairDataset, check_prefix_exists
from simpo_megatron.mathutil import ceil_div

_PROPORTION = re.compile(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*")


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Split a Megatron `--data-path` list into prefixes and weights (None when unweighted).

    Accepts `[PREFIX ...]` or `[WEIGHT PREFIX WEIGHT PREFIX ...]`, as megatron-core's
    get_blend_from_list reads them; weights must be positive and every PREFIX.bin/.idx must exist.
    """
    if not data_path:
        raise ValueError("data path is empty: give PREFIX ... or WEIGHT PREFIX WEIGHT PREFIX ...")
    prefixes, weights = get_blend_from_list(list(data_path))
    if weights is not None:
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"data path weights must be positive numbers, got {weights}")
    for prefix in prefixes:
        try:
            check_prefix_exists(prefix)
        except ValueError as error:
            if _PROPORTION.fullmatch(prefix):
                raise ValueError(
                    f"{error} ({prefix!r} looks like a weight: give either only prefixes or "
                    f"WEIGHT PREFIX pairs, got {list(data_path)})"
                ) from None
            raise
    return prefixes, weights


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Megatron's `--split` ("98,2,0": train, valid, test proportions) as [begin, end) fractions."""
    items = split.split(",")
    if len(items) > 3 or not all(_PROPORTION.fullmatch(item) for item in items):
        raise ValueError(f"split must be up to 3 comma-separated proportions like '98,2,0', got {split!r}")
    if sum(float(item) for item in items) <= 0:
        raise ValueError(f"split proportions must not all be zero, got {split!r}")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


class BlendedPairDataset(torch.utils.data.Dataset):
    """`size` pairs drawn from `datasets` in proportion to `weights`, in a fixed interleaving.

    The interleaving is megatron-core's `build_blending_indices` (each prefix of the blend is as
    close to the weights as it can be). The k-th draw from dataset d is entry k mod len(d) of a
    permutation seeded by (seed, d, k // len(d)): a dataset drawn less than its size gives a
    random subset, one drawn more repeats in freshly shuffled epochs. `weights` default to the
    datasets' sizes and `size` to their total; with both defaults every pair is drawn exactly once
    (megatron-core's exhaustive blending).
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float] | None,
        size: int | None,
        seed: int,
    ) -> None:
        if not datasets:
            raise ValueError("datasets must not be empty")
        lengths = np.array([len(d) for d in datasets], dtype=np.int64)
        if lengths.min() == 0:
            raise ValueError(f"every blended dataset needs at least one pair, got sizes {lengths.tolist()}")
        if weights is not None and (
            len(weights) != len(datasets) or not all(math.isfinite(w) and w > 0 for w in weights)
        ):
            raise ValueError(f"weights must be {len(datasets)} positive numbers, got {list(weights)}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")

        total = int(lengths.sum()) if size is None else size
        dataset_index = np.zeros(total, dtype=np.int16)
        dataset_sample_index = np.zeros(total, dtype=np.int64)
        if weights is None and size is None:
            helpers.build_exhaustive_blending_indices(dataset_index, dataset_sample_index, lengths, len(datasets))
        else:
            ratios = normalize(lengths.tolist() if weights is None else list(weights))
            helpers.build_blending_indices(
                dataset_index,
                dataset_sample_index,
                np.array(ratios, dtype=np.float64),
                len(datasets),
                total,
                False,
            )

        sample_index = np.empty(total, dtype=np.int64)
        for d, n in enumerate(lengths.tolist()):
            drawn = dataset_index == d
            draws = dataset_sample_index[drawn]
            if len(draws):
                epochs = range(ceil_div(len(draws), n))
                order = [np.random.default_rng((seed, d, e)).permutation(n) for e in epochs]
                sample_index[drawn] = np.concatenate(order)[draws]

        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.sample_index = sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> PairSample:
        return self.datasets[self.dataset_index[i]][self.sample_index[i]]


def _blend(
    parts: list[PreferencePairDataset], weights: list[float] | None, size: int | None, seed: int
) -> PreferencePairDataset | BlendedPairDataset:
    """One dataset as is; several blended (unweighted: each pair once, as in megatron-core)."""
    if len(parts) == 1:
        return parts[0]
    return BlendedPairDataset(parts, weights, None if weights is None else size, seed)


def build_pair_datasets(
    data_path: Sequence[str],
    split: str,
    valid_data_path: Sequence[str] | None,
    seq_length: int,
    max_prompt_length: int | None,
    seed: int,
    train_samples: int | None,
    valid_samples: int | None,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """The train and valid pair datasets (valid is None when there is none).

    Without `valid_data_path`, each prefix of `data_path` is split by `split` into contiguous
    train/valid/test ranges (the test part is left unused) and the parts of each split are
    blended with the same weights. With `valid_data_path`, `split` is ignored: all of
    `data_path` trains and all of `valid_data_path` validates. A weighted training blend draws
    `train_samples` pairs (default: the total of its parts); an unweighted one holds each pair
    once. A validation blend holds each of its pairs exactly once, whatever the weights, unless
    `valid_samples` asks for that many weighted draws. The sampler then cycles epochs over what
    is returned.
    """
    prefixes, weights = parse_data_path(data_path)

    def dataset(prefix: str, indices: np.ndarray | None = None) -> PreferencePairDataset:
        return PreferencePairDataset(prefix, seq_length, max_prompt_length, indices)

    if valid_data_path:
        valid_prefixes, valid_weights = parse_data_path(valid_data_path)
        train = _blend([dataset(p) for p in prefixes], weights, train_samples, seed)
        valid_parts = [dataset(p) for p in valid_prefixes]
        valid = _blend(valid_parts, valid_weights if valid_samples else None, valid_samples, seed)
        return train, valid

    train_range, valid_range, _ = split_matrix(split)
    if train_range is None:
        raise ValueError(f"split {split!r} leaves no training data")
    train_parts: list[PreferencePairDataset] = []
    valid_parts: list[PreferencePairDataset] = []
    for prefix in prefixes:
        num_pairs = len(dataset(prefix))
        for parts, bookends, name in (
            (train_parts, train_range, "train"),
            (valid_parts, valid_range, "valid"),
        ):
            if bookends is None:
                continue
            # Rounded as megatron-core's BlendedMegatronDatasetBuilder rounds its splits.
            begin, end = (int(round(b * float(num_pairs))) for b in bookends)
            if begin == end:
                raise ValueError(f"split {split!r} leaves no {name} pairs of {prefix} ({num_pairs} pairs)")
            parts.append(dataset(prefix, np.arange(begin, end)))
    train = _blend(train_parts, weights, train_samples, seed)
    valid = _blend(valid_parts, weights if valid_samples else None, valid_samples, seed) if valid_parts else None
    return train, valid
