"""The MoE config mapping and HF's router load-balancing loss, checked against transformers."""

from __future__ import annotations

import pytest
import torch

from simpo_megatron.config import ConfigError
from simpo_megatron.hf import HFConversionError
from simpo_megatron.hf.config_mapping import hf_config_to_overrides, to_hf_config
from simpo_megatron.model.moe import load_balancing_loss
from simpo_megatron.testing import tiny_config

transformers = pytest.importorskip("transformers")

E, K = 4, 2


def test_load_balancing_loss_is_hfs_with_padding_and_differs_from_megatrons():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(12, E, generator=g) * 2).requires_grad_() for _ in range(2)]
    mask = torch.tensor([1.0] * 9 + [0.0] * 3)
    ours = load_balancing_loss(logits, E, K, mask)
    hf = load_balancing_loss_func(tuple(logits), E, K, mask.reshape(3, 4))
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    ours_grads = torch.autograd.grad(ours, logits)
    hf_grads = torch.autograd.grad(hf, logits)
    for mine, theirs in zip(ours_grads, hf_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-8)
        assert mine[9:].abs().max() == 0 and mine[:9].abs().max() > 1e-3  # padding gets no gradient
    logits = [x.detach() for x in logits]
    assert not torch.allclose(ours, load_balancing_loss(logits, E, K))  # the mask matters

    # megatron-core's per-layer loss: one layer is HF's divided by k; two layers summed are not HF's.
    def mcore(layer: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(layer, -1)
        counts = torch.nn.functional.one_hot(probs.topk(K).indices, E).sum((0, 1)).float()
        return switch_load_balancing_loss_func(probs, counts, layer.shape[0], K, E, 1.0)

    torch.testing.assert_close(mcore(logits[0]) * K, load_balancing_loss(logits[:1], E, K), rtol=1e-6, atol=0)
    assert abs(float(sum(mcore(x) for x in logits)) * K - float(load_balancing_loss(logits, E, K))) > 1e-3


def test_the_tied_gradient_is_the_loss_gradient(monkeypatch):
    """What training does (each layer's statistics recorded, the micro-batch's totals, each
    layer's gradient tied in through ``_BalanceGradient``) gives the weighted loss's value and
    the gradient autograd gives through HF's function (``load_balancing_loss``, itself checked
    against transformers above), scaled by megatron-core's main-loss backward scale."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from simpo_megatron.model.moe import RouterBalance, _BalanceGradient, _Recording, layer_statistics

    g = torch.Generator().manual_seed(1)
    logits = [(torch.randn(12, E, generator=g) * 2).requires_grad_() for _ in range(3)]
    mask = torch.tensor([1.0] * 10 + [0.0] * 2)
    coeff, pairs, scale = 0.3, 5, 4.0
    expected = coeff * pairs * scale * load_balancing_loss(logits, E, K, mask)
    expected_grads = torch.autograd.grad(expected, logits)

    balance = RouterBalance(coeff, E, K)
    micro_batch = balance.micro_batch(0, pairs)
    recording, tied = _Recording(micro_batch), []
    for layer in logits:
        stats = layer_statistics(layer, E, K, mask)
        recording.add(stats)
        probs = torch.softmax(layer, -1)  # stands for what the router hands the dispatcher
        tied.append(_BalanceGradient.apply(probs, stats[1], micro_batch))
    balance.contribute(micro_batch, recording.totals)
    torch.testing.assert_close(micro_batch.value(torch.device("cpu")) * coeff * pairs * scale, expected.detach())
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", torch.tensor(scale))
    grads = torch.autograd.grad(sum((t * 0).sum() for t in tied), logits)  # the main loss adds nothing
    for mine, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-8)
        assert mine[10:].abs().max() == 0 and mine[:10].abs().max() > 1e-3


def _qwen3_moe(**changes) -> dict:
    config = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=200,
        num_experts=E, num_experts_per_tok=K, **{"norm_topk_prob": True, **changes},
    )  # fmt: skip
    return config.to_dict()


def test_moe_config_mapping_round_trip_and_errors():
    for hf in (
        _qwen3_moe(),
        transformers.MixtralConfig(
            hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, num_local_experts=E, num_experts_per_tok=K,
        ).to_dict(),
    ):  # fmt: skip
        overrides = hf_config_to_overrides(hf)
        assert (overrides["num_experts"], overrides["moe_router_topk"], overrides["moe_ffn_hidden_size"]) == (E, K, 32)
        assert overrides["moe_router_pre_softmax"] is False  # both renormalize the top-k weights
        assert overrides["qk_layernorm"] == (hf["model_type"] == "qwen3_moe")
        cfg = tiny_config(**overrides)
        assert hf_config_to_overrides(to_hf_config(cfg)) == overrides  # without a base config too
    assert hf_config_to_overrides(_qwen3_moe(norm_topk_prob=False))["moe_router_pre_softmax"] is True
    with pytest.raises(HFConversionError, match="mlp_only_layers"):
        hf_config_to_overrides(_qwen3_moe(mlp_only_layers=[1]))
    aux = hf_config_to_overrides(_qwen3_moe(output_router_logits=True, router_aux_loss_coef=0.01))
    assert aux["moe_aux_loss_coeff"] == 0.01
    tiny_config(**aux).validate(1)
    # The loss works across pipeline stages and through recomputed MoE layers.
    tiny_config(**aux, pipeline_model_parallel_size=2).validate(2)
    tiny_config(**aux, recompute_granularity="selective", recompute_modules=["moe"]).validate(1)
    for bad, match in ((dict(moe_aux_loss_coeff=-0.1), "must be >= 0"),):
        with pytest.raises(ConfigError, match=match):
            tiny_config(**{**aux, **bad}).validate(2)
    with pytest.raises(ConfigError, match="--moe-aux-loss-coeff need --num-experts"):
        tiny_config(moe_aux_loss_coeff=0.01).validate(1)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size"):
        tiny_config(**_ok(), expert_model_parallel_size=2).validate(1)
    with pytest.raises(ConfigError, match="--num-experts"):
        tiny_config(expert_model_parallel_size=2).validate(2)


def _ok() -> dict:
    return hf_config_to_overrides(_qwen3_moe())
