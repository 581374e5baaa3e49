"""Recompute flags' validation, and the memory estimate's warning and command (pure, no model)."""

import pytest

from simpo_megatron.cli import estimate_memory
from simpo_megatron.config import ConfigError, load_config
from simpo_megatron.memory_estimate import GIB, memory_warning, startup_report
from simpo_megatron.memory_estimate import estimate_memory as estimate
from simpo_megatron.testing import tiny_config

RECIPE = "examples/configs/llama3-8b-instruct.yaml"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(recompute_granularity="full"), "--recompute-granularity full needs --recompute-method"),
        (
            dict(recompute_granularity="full", recompute_method="block"),
            "--recompute-method block needs --recompute-num-layers",
        ),
        (
            dict(recompute_method="uniform", recompute_num_layers=1),
            "--recompute-method needs --recompute-granularity full",
        ),
        (
            dict(recompute_granularity="selective", recompute_num_layers=1),
            "--recompute-method and --recompute-num-layers are for",
        ),
        (dict(recompute_granularity="selective", recompute_modules=["attn"]), "--recompute-modules must be among"),
        (
            dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
            "needs --transformer-impl transformer_engine",
        ),
        (dict(recompute_granularity="selective", recompute_modules=["moe"]), "need a mixture-of-experts model"),
        (
            dict(num_experts=4, recompute_granularity="selective", recompute_modules=["moe_act"]),
            "moe_act needs megatron-core's grouped-GEMM experts",
        ),
        (dict(num_experts=4, moe_router_topk=1), "--moe-router-topk 1 needs --moe-router-pre-softmax"),
        (dict(recompute_modules=["mlp"]), "--recompute-modules needs --recompute-granularity selective"),
        (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
            "divisible by --recompute-num-layers (3)",
        ),
        (
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
            "--recompute-num-layers (5) must be in [1, layers per model chunk (4)]",
        ),
        (dict(gpu_memory_gb=0.0), "--gpu-memory-gb must be > 0"),
    ],
)
def test_bad_recompute_settings_name_the_flag(settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**settings).validate(1)


def test_full_recompute_shrinks_the_recipe_s_activations_and_the_warning_names_it():
    cfg = load_config(["--config", RECIPE, "--mock-data"]).validate(8)
    full = cfg.replace(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1).validate(8)
    assert estimate(full, 8).activations < estimate(cfg, 8).activations / 5
    assert memory_warning(cfg, 8, 80 * GIB) is None
    warning = memory_warning(cfg, 8, 48 * GIB)
    assert "Would fit" in warning and "--recompute-granularity full --recompute-method uniform" in warning
    # More data-parallel ranks shard the distributed optimizer's state thinner.
    assert estimate(cfg, 16).optimizer == estimate(cfg, 8).optimizer // 2


def test_estimate_command(capsys):
    assert estimate_memory(["--config", RECIPE, "--world-size", "8", "--gpu-memory-gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per GPU" in out and "WARNING" in out
    assert estimate_memory(["--config", "missing.yaml"]) == 2
    # Without --world-size, the smallest world the layout runs on: EP=8 takes 8 data-parallel ranks.
    moe = "examples/configs/qwen3-30b-a3b-simpo.yaml"
    assert estimate_memory(["--config", moe, "--gpu-memory-gb", "80"]) == 0
    default = capsys.readouterr().out
    assert estimate_memory(["--config", moe, "--gpu-memory-gb", "80", "--world-size", "8"]) == 0
    assert capsys.readouterr().out == default and "80.5 GiB" in default


def test_a_mixture_of_experts_that_does_not_fit_is_told_to_spread_its_experts():
    """The experts dominate an MoE model's memory: EP splits them (and recomputing the MoE layers
    drops their routed activations); the warning names EP among the changes that help."""
    cfg = tiny_config(num_experts=8, moe_ffn_hidden_size=64, bf16=True).validate(2)
    report = startup_report(cfg, 2, estimate(cfg, 2).total * 2)
    assert report.startswith("memory estimate per GPU") and "WARNING" not in report
    ep2 = cfg.replace(expert_model_parallel_size=2).validate(2)
    assert estimate(ep2, 2).weights < estimate(cfg, 2).weights
    moe = cfg.replace(recompute_granularity="selective", recompute_modules=["moe"]).validate(2)
    assert estimate(moe, 2).activations < estimate(cfg, 2).activations
    warning = memory_warning(cfg, 2, int(estimate(ep2, 2).total / 0.89))
    assert "Would fit" in warning and "--expert-model-parallel-size 2" in warning
