"""Activation recompute changes what backward keeps, not what it computes.

One spawned group of two processes runs each layout (TP=2, PP=2, packed rows over DP=2,
CP=2, a mixture of experts on EP=2) on one global batch with dropout on: the model is built once per recompute mode with
the same weights and the same RNG state, runs forward and backward through megatron-core's
schedule, and reports the step's loss and every gradient. Recompute reruns the forward in
backward with the forward's RNG state restored, so the numbers must be identical.
"""

import numpy as np
import pytest

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

MODES = {
    "off": {},
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    "selective_moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}
# name: (config fields, the recompute modes compared with "off"); each mode on two layouts.
LAYOUTS = {
    "tp2": (dict(tensor_model_parallel_size=2), ("selective",)),
    "pp2": (dict(pipeline_model_parallel_size=2, micro_batch_size=1), ("full_block",)),
    "dp2_packed": (dict(packing=True, micro_batch_size=1), ("full_uniform",)),
    "cp2": (dict(context_parallel_size=2, seq_length=36), ("full_uniform", "full_block", "selective")),
    # A mixture of experts on EP=2 (padded rows: the padding routed to no expert, in recompute too),
    # with the router load-balancing loss, whose gradient recomputed layers tie in their re-run.
    "moe_ep2": (
        dict(num_experts=4, expert_model_parallel_size=2, moe_aux_loss_coeff=0.5),
        ("full_uniform", "selective_moe"),
    ),
}


def _worker(layouts: dict, modes: dict):
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, global_batches
    from simpo_megatron.runtime import initialize_distributed, set_seed
    from simpo_megatron.training.loop import resolve_config
    from simpo_megatron.training.trainer import _last_stage_metrics, run_schedule, setup_model_and_optimizer

    results = {}
    for name, (layout, compared) in layouts.items():
        cfg = tiny_config(global_batch_size=4, hidden_dropout=0.1, attention_dropout=0.1, sft_weight=0.5, **layout)
        cfg, tokenizer = resolve_config(cfg)
        cfg.validate(2)
        initialize_distributed(cfg.parallel_layout(), seed=3)
        data = build_datasets(cfg, tokenizer)
        dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        batches = next(global_batches(data.train, cfg, data.pad_id, 0, *dp))
        weights = None
        for mode in ("off", *compared):
            settings = modes[mode]
            run_cfg = cfg.replace(**settings).validate(2)
            set_seed(3)
            state = setup_model_and_optimizer(run_cfg, run_cfg.padded_vocab_size())
            params = [p for chunk in state.model for p in chunk.parameters()]
            if weights is None:
                weights = [p.detach().clone() for p in params]
            for p, w in zip(params, weights):
                p.data.copy_(w)
            set_seed(4)  # the same dropout masks in every mode
            for chunk in state.model:
                chunk.train()
                chunk.zero_grad_buffer()
            outputs = run_schedule(run_cfg, state.model, batches, forward_only=False)
            metrics = _last_stage_metrics(outputs)
            grads = [p.main_grad.numpy().copy() for p in params]  # numpy: torch tensors would go by shared memory
            results[name, mode] = (None if metrics is None else metrics["loss"], grads)
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, LAYOUTS, MODES)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recompute_gives_the_same_loss_and_gradients(results, layout):
    losses = [r[layout, "off"][0] for r in results if r[layout, "off"][0] is not None]
    assert losses and all(loss > 0 for loss in losses)
    for rank_results in results:
        loss, grads = rank_results[layout, "off"]
        assert sum(abs(g).sum() for g in grads) > 0
        for mode in LAYOUTS[layout][1]:
            other_loss, other_grads = rank_results[layout, mode]
            assert other_loss == loss, mode
            assert len(other_grads) == len(grads)
            for i, (a, b) in enumerate(zip(grads, other_grads)):
                assert np.array_equal(b, a), f"{mode}: gradient {i}"
