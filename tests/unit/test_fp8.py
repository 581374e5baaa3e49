"""FP8 flags: their mapping to megatron-core's TransformerConfig, and the clear errors where
Transformer Engine or a capable GPU is missing (never a silent fallback to bf16).

megatron-core 0.16.1's TransformerConfig takes the FP8 fields without importing Transformer
Engine or touching CUDA (they are read when the TE layers run, inside megatron's FP8
context), so here the full TransformerConfig is built for every format x recipe combination,
on the CPU. The FP8 forward/backward itself is in tests/gpu/test_gpu_training.py.
"""

import dataclasses
import itertools
import sys
import types

import pytest
import torch
from megatron.core.enums import Fp8Recipe
from megatron.core.transformer.transformer_config import TransformerConfig

from simpo_megatron.config import ConfigError, ModelConfig, SimPOConfig
from simpo_megatron.config.sections import field_choices
from simpo_megatron.model import fp8 as fp8_module
from simpo_megatron.model.fp8 import (
    FP8UnavailableError,
    TransformerEngineUnavailableError,
    check_transformer_engine,
    fp8_config_kwargs,
)
from simpo_megatron.model.gpt import layer_spec, transformer_config
from simpo_megatron.testing import tiny_config

FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_FIELDS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param")


def fp8_cfg(**overrides) -> SimPOConfig:
    values = dict(transformer_impl="transformer_engine", fp8_format="hybrid", bf16=True)
    values.update(overrides)
    return tiny_config(**values)


def test_the_flag_choices_are_the_combinations_tested_here():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert [c for c in field_choices(fields["fp8_format"]) if c] == list(FORMATS)
    assert list(field_choices(fields["fp8_recipe"])) == list(RECIPES)
    # every recipe flag is a megatron-core Fp8Recipe, with a minimum GPU it is checked against
    assert {r.value for r in Fp8Recipe} >= set(RECIPES)
    assert set(fp8_module._MIN_CAPABILITY) == set(RECIPES)


def test_no_fp8_format_means_no_fp8_fields():
    assert fp8_config_kwargs(tiny_config().model) == {}
    config = transformer_config(tiny_config().model)
    assert config.fp8 is None
    assert config.fp8_param is False


@pytest.mark.parametrize("fmt, recipe", list(itertools.product(FORMATS, RECIPES)))
@pytest.mark.parametrize("param_gather", [False, True], ids=["no_param_gather", "param_gather"])
def test_fp8_flags_map_to_transformer_config(fmt, recipe, param_gather):
    cfg = fp8_cfg(
        fp8_format=fmt,
        fp8_recipe=recipe,
        fp8_margin=1,
        fp8_amax_history_len=16,
        fp8_amax_compute_algo="most_recent",
        fp8_param_gather=param_gather,
    )
    cfg.validate(1)
    expected = {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": 1,
        "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "most_recent",
        "fp8_param": param_gather,
    }
    assert fp8_config_kwargs(cfg.model) == expected

    config = transformer_config(cfg.model)  # the real megatron-core TransformerConfig, built on the CPU
    assert isinstance(config, TransformerConfig)
    assert {name: getattr(config, name) for name in FP8_FIELDS} == expected
    # megatron-core compares the recipe with its enum: the string flag must compare equal
    assert config.fp8_recipe == Fp8Recipe(recipe)
    # FP8 runs inside bf16 training: parameters and the pipeline dtype stay bf16
    assert config.bf16 and config.params_dtype == torch.bfloat16


def test_fp8_defaults_are_megatron_lm_defaults():
    """Megatron-LM's FP8 flags default to megatron-core's TransformerConfig values (not TE's
    DelayedScaling defaults of history 1024 and "max"): pin ours to megatron-core's own."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    mcore = {name: f.default for name, f in TransformerConfig.__dataclass_fields__.items()}
    kwargs = fp8_config_kwargs(fp8_cfg().model)
    for ours, theirs in (
        ("fp8_margin", "fp8_margin"),
        ("fp8_amax_history_len", "fp8_amax_history_len"),
        ("fp8_amax_compute_algo", "fp8_amax_compute_algo"),
        ("fp8_param", "fp8_param"),
    ):
        assert kwargs[ours] == mcore[theirs], ours
    assert kwargs["fp8_amax_history_len"] == 1 and kwargs["fp8_amax_compute_algo"] == "most_recent"
    assert kwargs["fp8"] == "hybrid" and kwargs["fp8_recipe"] == "delayed"


def test_fp8_flags_from_the_command_line():
    from simpo_megatron.config import load_config

    cfg = load_config(
        [
            "--mock-data",
            "--transformer-impl",
            "transformer_engine",
            "--bf16",
            "--fp8-format",
            "e4m3",
            "--fp8-recipe",
            "tensorwise",
            "--fp8-amax-history-len",
            "32",
            "--fp8-param-gather",
        ]
    )
    cfg.validate(1)
    assert fp8_config_kwargs(cfg.model)["fp8"] == "e4m3"
    assert fp8_config_kwargs(cfg.model)["fp8_recipe"] == "tensorwise"
    assert fp8_config_kwargs(cfg.model)["fp8_amax_history_len"] == 32
    assert fp8_config_kwargs(cfg.model)["fp8_param"] is True


# ------------------------------------------------------------------ configuration errors


def test_fp8_format_without_transformer_engine_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="--fp8-format needs --transformer-impl transformer_engine"):
        tiny_config(fp8_format="hybrid").validate(1)


def test_fp8_param_gather_without_fp8_format_is_a_config_error():
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --fp8-format"):
        tiny_config(transformer_impl="transformer_engine", fp8_param_gather=True).validate(1)


# ------------------------------------------------------------------ what is missing at run time


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("cfg", [fp8_cfg(), fp8_cfg(fp8_format=None)], ids=["fp8", "te_only"])
def test_without_cuda_transformer_engine_is_refused_with_a_clear_message(cfg):
    with pytest.raises(TransformerEngineUnavailableError) as info:
        check_transformer_engine(cfg.model)
    assert not isinstance(info.value, FP8UnavailableError)  # what is missing is TE, FP8 asked for or not
    message = str(info.value)
    assert "CUDA GPU" in message and "--transformer-impl transformer_engine" in message
    assert "--transformer-impl local" in message  # says what to do instead


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_model_builder_refuses_te_layers_without_cuda():
    with pytest.raises(TransformerEngineUnavailableError, match="CUDA GPU"):
        layer_spec(fp8_cfg().model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_training_entry_point_stops_with_the_error_before_any_process_group(capsys):
    import torch.distributed as dist

    from simpo_megatron.training.loop import main

    code = main(
        [
            "--mock-data",
            "--transformer-impl",
            "transformer_engine",
            "--bf16",
            "--fp8-format",
            "hybrid",
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--vocab-size",
            "200",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "2",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "CUDA GPU" in err
    assert not dist.is_initialized()


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device of a given compute capability is present (nothing runs on it)."""

    def install(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)

    return install


@pytest.fixture
def no_transformer_engine(monkeypatch):
    # A None entry in sys.modules makes `import transformer_engine` raise ImportError.
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)


@pytest.fixture
def fake_transformer_engine(monkeypatch):
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)


@pytest.mark.parametrize("cfg", [fp8_cfg(), fp8_cfg(fp8_format=None)], ids=["fp8", "te_only"])
def test_without_transformer_engine_the_message_says_how_to_install_it(cfg, fake_cuda, no_transformer_engine):
    fake_cuda((9, 0))
    with pytest.raises(TransformerEngineUnavailableError) as info:
        check_transformer_engine(cfg.model)
    assert not isinstance(info.value, FP8UnavailableError)  # what is missing is TE, FP8 asked for or not
    message = str(info.value)
    assert "transformer_engine package" in message
    assert "pip install transformer_engine[pytorch]" in message
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    "recipe, capability, ok",
    [
        ("delayed", (8, 0), False),  # A100: no FP8
        ("delayed", (8, 9), True),  # Ada
        ("delayed", (9, 0), True),  # H100
        ("tensorwise", (8, 6), False),
        ("tensorwise", (9, 0), True),
        ("blockwise", (8, 9), False),
        ("blockwise", (9, 0), True),
        ("mxfp8", (9, 0), False),  # MXFP8 needs Blackwell
        ("mxfp8", (10, 0), True),
    ],
)
def test_fp8_recipe_needs_a_capable_gpu(recipe, capability, ok, fake_cuda, fake_transformer_engine):
    fake_cuda(capability)
    cfg = fp8_cfg(fp8_recipe=recipe)
    if ok:
        check_transformer_engine(cfg.model)
        return
    with pytest.raises(FP8UnavailableError) as info:
        check_transformer_engine(cfg.model)
    need = fp8_module._MIN_CAPABILITY[recipe]
    message = str(info.value)
    assert f"--fp8-recipe {recipe}" in message
    assert f"{need[0]}.{need[1]}" in message and f"{capability[0]}.{capability[1]}" in message


def test_te_layers_without_fp8_need_no_fp8_capable_gpu(fake_cuda, fake_transformer_engine):
    fake_cuda((8, 0))
    check_transformer_engine(fp8_cfg(fp8_format=None).model)
