"""PairBatchSampler: per-epoch shuffling, data-parallel sharding, exact resume."""

from itertools import islice

import pytest

from simpo_megatron.data import PairBatchSampler


def micro_batches(n: int, total=12, consumed=0, mbs=1, gbs=4, rank=0, dp=1, **kwargs):
    sampler = PairBatchSampler(total, consumed, mbs, gbs, rank, dp, **kwargs)
    return list(islice(iter(sampler), n))


def global_batches(num: int, total=12, consumed=0, mbs=1, gbs=4, dp=1, **kwargs):
    """Per global batch, the micro-batches of every rank, rank by rank."""
    per_rank = gbs // (mbs * dp)
    streams = [micro_batches(num * per_rank, total, consumed, mbs, gbs, r, dp, **kwargs) for r in range(dp)]
    return [[mb for stream in streams for mb in stream[g * per_rank : (g + 1) * per_rank]] for g in range(num)]


def flat(batches):
    return [i for batch in batches for i in batch]


def test_each_epoch_is_a_fresh_permutation_deterministic_per_seed():
    stream = flat(micro_batches(36, total=12, gbs=4, seed=7))
    epochs = [stream[0:12], stream[12:24], stream[24:36]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    # Every pair of epochs differs (a chained != would leave epoch 0 against epoch 2 unchecked).
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert stream == flat(micro_batches(36, total=12, gbs=4, seed=7))
    assert stream != flat(micro_batches(36, total=12, gbs=4, seed=8))


def test_shuffle_off_walks_the_pairs_in_order():
    assert flat(micro_batches(6, total=6, mbs=2, gbs=2, shuffle=False)) == [0, 1, 2, 3, 4, 5] * 2


def test_drop_last_uses_a_whole_number_of_global_batches():
    # 10 pairs, global batch 4: 8 distinct pairs per epoch, the 2 left out change per epoch.
    stream = flat(micro_batches(8 * 6, total=10, gbs=4, seed=1))
    epochs = [stream[k : k + 8] for k in range(0, len(stream), 8)]
    assert all(len(set(e)) == 8 and set(e) <= set(range(10)) for e in epochs)
    assert len({frozenset(e) for e in epochs}) > 1

    # Without drop_last the epoch is 12 long: every pair, then the first 2 again.
    stream = flat(micro_batches(12 * 2, total=10, gbs=4, seed=1, drop_last=False))
    for epoch in (stream[:12], stream[12:]):
        assert sorted(epoch[:10]) == list(range(10)) and epoch[10:] == epoch[:2]
    assert stream[:12] != stream[12:]


def test_micro_batches_have_the_requested_size():
    assert all(len(mb) == 3 for mb in micro_batches(20, total=30, mbs=3, gbs=12, dp=2))


@pytest.mark.parametrize("mbs, dp", [(1, 2), (2, 2), (1, 4), (2, 1), (4, 1)])
def test_global_batches_do_not_depend_on_layout(mbs, dp):
    reference = global_batches(9, total=14, gbs=4, seed=5)  # mbs 1, dp 1; crosses epochs
    layout = global_batches(9, total=14, mbs=mbs, gbs=4, dp=dp, seed=5)
    # The same pairs in the same order: rank r holds the r-th contiguous slice.
    assert [flat(g) for g in layout] == [flat(g) for g in reference]
    for g in layout:
        assert all(len(mb) == mbs for mb in g) and len(g) == 4 // mbs


def test_ranks_partition_each_global_batch():
    gbs, dp = 8, 4
    streams = [flat(micro_batches(6, total=24, mbs=1, gbs=gbs, rank=r, dp=dp)) for r in range(dp)]
    everything = flat(micro_batches(3 * gbs, total=24, mbs=1, gbs=gbs))
    for g in range(3):
        shards = [s[g * 2 : g * 2 + 2] for s in streams]
        assert flat(shards) == everything[g * gbs : (g + 1) * gbs]
        assert len(set(flat(shards))) == gbs


@pytest.mark.parametrize("stop_after", [1, 2, 3, 7])  # 3 global batches per epoch
@pytest.mark.parametrize("mbs, dp", [(1, 1), (2, 2)])
def test_resume_continues_the_uninterrupted_stream(stop_after, mbs, dp):
    gbs, total = 8, 27
    per_rank = gbs // (mbs * dp)
    for rank in range(dp):
        whole = micro_batches(12 * per_rank, total, 0, mbs, gbs, rank, dp, seed=11)
        resumed = micro_batches((12 - stop_after) * per_rank, total, stop_after * gbs, mbs, gbs, rank, dp, seed=11)
        assert resumed == whole[stop_after * per_rank :]


@pytest.mark.parametrize(
    "args, name",
    [
        ((12, 0, 0, 4, 0, 1), "micro_batch_size"),
        ((12, 0, 1, 0, 0, 1), "global_batch_size"),
        ((12, 0, 1, 4, 0, 0), "data_parallel_size"),
        ((12, 0, 2, 6, 0, 2), "global_batch_size"),  # not a multiple of mbs x dp
        ((12, 0, 1, 4, 2, 2), "data_parallel_rank"),
        ((3, 0, 1, 4, 0, 1), "total_pairs"),
        ((12, 6, 1, 4, 0, 1), "consumed_samples"),
        ((12, -4, 1, 4, 0, 1), "consumed_samples"),
    ],
)
def test_bad_arguments_name_themselves(args, name):
    with pytest.raises(ValueError, match=name):
        PairBatchSampler(*args)


@pytest.mark.parametrize(
    "total, mbs, gbs, dp", [(11, 1, 4, 2), (11, 2, 4, 2), (256, 2, 12, 2), (5, 4, 8, 1), (3, 1, 8, 4)]
)
def test_one_pass_sampler_yields_each_pair_once_and_the_same_steps_on_every_rank(total, mbs, gbs, dp):
    from simpo_megatron.data.sampler import OnePassBatchSampler

    per_rank = gbs // (mbs * dp)
    streams = [list(OnePassBatchSampler(total, mbs, gbs, r, dp)) for r in range(dp)]
    steps = -(-total // gbs)
    for r, stream in enumerate(streams):
        assert len(stream) == len(OnePassBatchSampler(total, mbs, gbs, r, dp)) == steps * per_rank
        assert all(len(mb) <= mbs for mb in stream)
    everything = sorted(i for stream in streams for mb in stream for i in mb)
    assert everything == list(range(total))
    # Full global batches are laid out as training lays them out (unshuffled).
    full = total // gbs
    if full:
        for r in range(dp):
            assert streams[r][: full * per_rank] == micro_batches(
                full * per_rank, total, 0, mbs, gbs, r, dp, shuffle=False
            )


def test_one_pass_sampler_checks_its_layout():
    from simpo_megatron.data.sampler import OnePassBatchSampler

    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        OnePassBatchSampler(10, 3, 4, 0, 1)
    with pytest.raises(ValueError, match="total_pairs"):
        OnePassBatchSampler(0, 1, 4, 0, 1)
