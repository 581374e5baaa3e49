"""The router load-balancing loss across pipeline stages: virtual stages and recompute.

HF's loss couples the routing of every layer of a micro-batch, so under pipeline parallelism
the stages exchange their statistics and each layer's gradient is computed in backward
(``model/moe.py``). test_trl_moe_equivalence checks PP=2 against TRL; this checks what the
two-layer model there cannot: a 4-layer mixture of experts (the router loss at 0.5) takes one
step on PP=2 with two virtual stages per rank (the interleaved schedule, whose stages reach a
micro-batch in another order), and on PP=2 with every layer recomputed, equal to the same step
on DP=2 (the same micro-batches of one pair) from the same HF weights: loss, router loss, grad
norm and every gradient (Adam's first moment), the routers' included; and the evaluation after it.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_moe_interop import _full_tensors, make_hf_model

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

# name -> config changes; world 2, global batch 4 pairs in micro-batches of 1.
LAYOUTS = {
    "dp2": {},
    "pp2_vpp2": dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
    "pp2_full_recompute": dict(
        pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
}
BASELINE = "dp2"
METRICS = ("loss", "load_balancing_loss", "rewards/chosen", "rewards/margins", "logps/chosen", "num_pairs", "grad_norm")


def _worker(hf_dir: str, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    metrics = {}
    for name, changes in LAYOUTS.items():
        cfg = tiny_config(
            load=hf_dir,
            moe_aux_loss_coeff=0.5,
            save=os.path.join(root, name),
            micro_batch_size=1,
            global_batch_size=4,
            train_iters=1,
            log_interval=1,
            lr=1e-3,
            lr_decay_style="constant",
            clip_grad=0.0,
            eval_interval=1,
            eval_iters=1,
            **changes,
        )
        result = pretrain(cfg)
        metrics[name] = (result["train"] or {}) | {f"valid/{k}": v for k, v in (result["valid"] or {}).items()}
        parallel_state.destroy_model_parallel()
    return metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_pipeline")
    hf_dir = make_hf_model("mixtral", root / "hf", num_hidden_layers=4)  # test_moe_interop's Mixtral, 4 layers
    metrics = run_distributed(_worker, 2, hf_dir, str(root))[-1]  # the last rank: the last stage's metrics
    tensors = {n: _full_tensors(str(root / n / "iter_0000001"), str(root / f"{n}.pt")) for n in LAYOUTS}
    return metrics, tensors


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != BASELINE])
def test_router_loss_across_stages_equals_one_stage(trained, name):
    metrics, tensors = trained
    assert metrics[BASELINE]["num_pairs"] == 4 and metrics[BASELINE]["load_balancing_loss"] > 0
    assert metrics[BASELINE]["valid/load_balancing_loss"] > 0  # evaluation (forward only) reports it too
    for key in METRICS + tuple(f"valid/{k}" for k in ("loss", "load_balancing_loss")):
        assert metrics[name][key] == pytest.approx(metrics[BASELINE][key], rel=1e-5, abs=1e-6), key
    base, mine = tensors[BASELINE], tensors[name]
    first_moments = [k for k in base if k.startswith("optimizer.state.exp_avg.")]
    assert first_moments and any("router" in k for k in first_moments)
    for key in first_moments:  # (1 - beta1) x gradient
        torch.testing.assert_close(mine[key], base[key], rtol=1e-4, atol=1e-7, msg=key)
