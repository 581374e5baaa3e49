"""Distributed-optimizer state saved with --dist-ckpt-optim-fully-reshardable resumes on another
layout and training goes on as if it had never moved.

On 4 gloo processes: a run trains 2 steps and saves after each; its step-1 checkpoint is then
resumed on another layout (TP2xDP2 -> PP2xDP2, and CP2xDP2 -> CP1xDP4) for step 2. The resumed
step's metrics, and the weights and Adam moments after it, equal the uninterrupted run's (up to
the rounding of the layouts). Step 2's update depends on step 1's moments and step count: Adam
state that started fresh, or that landed on the wrong parameters, would change it.
"""

import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

# name: (TP, PP, CP); the uninterrupted run and the layout its step-2 checkpoint resumes on.
MOVES = {"tp2_to_pp2": ((2, 1, 1), (1, 2, 1)), "cp2_to_cp1": ((1, 1, 2), (1, 1, 1))}
TRAIN_ITERS = 2
SAVED_AT = 1
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm", "lr")


def _config(layout, **kw):
    tp, pp, cp = layout
    return tiny_config(
        num_layers=2,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        micro_batch_size=1,
        global_batch_size=4,
        use_distributed_optimizer=True,
        dist_ckpt_optim_fully_reshardable=True,
        lr_decay_style="cosine",
        adam_eps=1e-2,  # keeps updates smooth in the gradient: layouts differ by rounding
        train_iters=TRAIN_ITERS,
        log_interval=1,
        **kw,
    )


def _copy_checkpoint(src_root: str, iteration: int, dst_root: str) -> None:
    """``dst_root`` with ``src_root``'s checkpoint of ``iteration`` as its newest."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(src_root, name), os.path.join(dst_root, name))
    with open(os.path.join(dst_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _worker(root: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    for name, (before, after) in MOVES.items():
        straight, moved = os.path.join(root, f"{name}_straight"), os.path.join(root, f"{name}_moved")
        pretrain(_config(before, save=straight, save_interval=SAVED_AT))
        parallel_state.destroy_model_parallel()
        if dist.get_rank() == 0:
            _copy_checkpoint(straight, SAVED_AT, moved)
        dist.barrier()
        pretrain(_config(after, load=moved, save=moved))
        parallel_state.destroy_model_parallel()


def _train_records(path: str) -> dict[int, dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in records if r["split"] == "train"}


def _full_tensors(ckpt_dir: str, flat_path: str) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, flat_path)
    return {k: v for k, v in torch.load(flat_path, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_optimizer")
    run_distributed(_worker, 4, str(root))
    return root


@pytest.mark.parametrize("name", list(MOVES))
def test_moved_run_trains_on_as_the_straight_run(root, name):
    straight, moved = root / f"{name}_straight", root / f"{name}_moved"
    expected, resumed = _train_records(straight / "metrics.jsonl"), _train_records(moved / "metrics.jsonl")
    assert sorted(expected) == list(range(1, TRAIN_ITERS + 1))
    assert sorted(resumed) == list(range(SAVED_AT + 1, TRAIN_ITERS + 1))
    for iteration in resumed:
        assert resumed[iteration]["consumed_samples"] == expected[iteration]["consumed_samples"]
        for key in METRICS:
            assert resumed[iteration][key] == pytest.approx(expected[iteration][key], rel=1e-5, abs=1e-5), (
                iteration,
                key,
            )

    last = f"iter_{TRAIN_ITERS:07d}"
    theirs = _full_tensors(str(straight / last), str(root / f"{name}_straight.pt"))
    mine = _full_tensors(str(moved / last), str(root / f"{name}_moved.pt"))
    params = [k for k in theirs if not k.startswith("optimizer.")]
    moments = [k for k in theirs if k.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."))]
    assert len(moments) == 2 * len(params) > 10
    assert set(mine) >= set(params) | set(moments)
    for key in params + moments:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-7, msg=key)
