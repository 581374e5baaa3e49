"""The memory estimate against what a tiny model on the CPU really holds.

One process builds the model for each case, measures the activations one micro-batch's
forward keeps for backward (``SavedTensorMeter``) and the bytes of the parameters, the
gradient buffers and the optimizer state after one Adam step, and compares them with
``estimate_memory``: within 15% for the activations, exactly for the rest (fp32 master copies of
bf16 weights included; up to the distributed optimizer's padding). Mixtures of experts
too, with every token real (the estimate's worst case: padding reaches no expert) and, on two
processes, their experts split over EP=2 with the distributed optimizer (experts and dense
parameters sharded over different groups).
"""

import os

import pytest

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

CASES = {
    "plain": {},
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    "chunked_head": dict(logprob_chunk_size=16),
    "softcap": dict(attn_logit_softcapping=50.0),
    "bf16": dict(bf16=True),
    "moe": dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.1),
    "moe_bf16": dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48, bf16=True),
    "moe_recompute": dict(
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        recompute_granularity="selective",
        recompute_modules=["moe"],
    ),
}
# Two processes: DP=2, the experts over EP=2.
EP_CASES = {
    "moe_ep2_distopt": dict(
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        expert_model_parallel_size=2,
        use_distributed_optimizer=True,
    ),
}


def _measure(cases: dict):
    import dataclasses

    import torch
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, global_batches
    from simpo_megatron.memory_estimate import estimate_memory
    from simpo_megatron.runtime import initialize_distributed
    from simpo_megatron.saved_tensors import SavedTensorMeter
    from simpo_megatron.training.loop import resolve_config
    from simpo_megatron.training.step import forward_step
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    out = {}
    for name, settings in cases.items():
        # Micro-batches padded to --seq-length: the shape the estimate assumes.
        cfg, tokenizer = resolve_config(tiny_config(pad_to_multiple_of=0, **settings))
        world = int(os.environ["WORLD_SIZE"])
        cfg.validate(world)
        initialize_distributed(cfg.parallel_layout(), seed=1)
        data = build_datasets(cfg, tokenizer)
        dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        batches = next(global_batches(data.train, cfg, data.pad_id, 0, *dp))
        if cfg.model.num_experts:  # every token real, so routed: the estimate's worst case
            batches = [dataclasses.replace(b, token_mask=None) for b in batches]
        state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
        model = state.model[0]
        model.train()
        params = list(model.parameters())
        with SavedTensorMeter(exclude=params) as meter:
            output, loss_func = forward_step(cfg.loss, cfg.model.vocab_size, iter(batches[:1]), model)
            loss_func(output)
        del output, loss_func
        train_step(cfg, state, batches)
        optimizers = state.optimizer.chained_optimizers
        optimizer_state = [t for opt in optimizers for s in opt.optimizer.state.values() for t in s.values()]
        # The fp32 master copies of bf16 parameters (the distributed optimizer keeps its shard's).
        for opt in optimizers:
            masters = getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(
                opt, "fp32_from_float16_groups", []
            )
            optimizer_state += [t for group in masters for t in group]
        estimate = estimate_memory(cfg, world)
        out[name] = dict(
            activations=meter.kept_bytes,
            weights=sum(p.numel() * p.element_size() for p in params),
            gradients=sum(
                b.grad_data.numel() * b.grad_data.element_size()
                for b in [*model.buffers, *model.expert_parallel_buffers]
            ),
            optimizer=sum(t.numel() * t.element_size() for t in optimizer_state if torch.is_tensor(t) and t.dim()),
            estimate=estimate,
        )
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 1, CASES)[0] | run_distributed(_measure, 2, EP_CASES)[0]


@pytest.mark.parametrize("case", [*CASES, *EP_CASES])
def test_estimate_matches_the_measured_memory(measured, case):
    m = measured[case]
    est = m["estimate"]
    assert est.micro_batches_in_flight == 1
    assert est.activations_per_micro_batch == pytest.approx(m["activations"], rel=0.15)
    assert est.weights == m["weights"]
    # The distributed optimizer pads its buffers to a multiple of the DP size (bytes here).
    padding = 0.001 if "distopt" in case else 0
    assert est.gradients == pytest.approx(m["gradients"], rel=padding)
    assert est.optimizer == pytest.approx(m["optimizer"], rel=padding)


def test_recompute_lowers_both_the_measured_and_the_estimated_activations(measured):
    for case, base in (
        ("full_uniform", "plain"),
        ("full_block", "plain"),
        ("selective", "plain"),
        ("chunked_head", "plain"),
        ("moe_recompute", "moe"),
    ):
        assert measured[case]["activations"] < measured[base]["activations"], case
        assert measured[case]["estimate"].activations < measured[base]["estimate"].activations, case
