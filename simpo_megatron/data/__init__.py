"""Preference-pair data: the indexed dataset read path, sampling and collation.

The names below load on first use, so that the preprocessing tool (`data.preprocess`, which
imports only the write path: readers, pair_encoding, tokenizers, builder) does not pay for
megatron-core (the read path needs it).
"""

from importlib import import_module

_EXPORTS = {
    "BatchLayout": "batch",
    "MicroBatch": "batch",
    "PackedLayout": "batch",
    "ReferenceScores": "batch",
    "collate": "batch",
    "BlendedPairDataset": "blended",
    "build_pair_datasets": "blended",
    "parse_data_path": "blended",
    "PreferencePairDataset": "pair_dataset",
    "PairBatchSampler": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
