"""Preference-pair data: the indexed dataset read path, sampling and collation."""

from simpo_megatron.data.blended import BlendedPairDataset, build_pair_datasets, parse_data_path
from simpo_megatron.data.pair_dataset import PreferencePairDataset, collate_pairs
from simpo_megatron.data.sampler import PairBatchSampler
