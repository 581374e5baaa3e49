"""simpo_megatron.config: flag / YAML precedence, booleans, list flags, and validate()'s errors.

Pure unit tests: no process group is started. ``validate(world_size)`` only checks the flags
against each other and the world size, so every error is reachable with a plain SimPOConfig.
"""

import math
import re

import pytest
import yaml

from simpo_megatron.config import ConfigError, SimPOConfig, build_parser, load_config, read_yaml


def write_yaml(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def base(**overrides) -> SimPOConfig:
    """A configuration that validates on one process; tests change one thing at a time."""
    values = dict(
        mock_data=True, num_layers=8, hidden_size=256, num_attention_heads=8, micro_batch_size=2, global_batch_size=8
    )
    values.update(overrides)
    return SimPOConfig.from_flat(values)


# ------------------------------------------------------------------ precedence


def test_no_arguments_gives_the_dataclass_defaults():
    assert load_config([]) == SimPOConfig()


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, "hidden_size: 512\nnum_layers: 6\nbeta: 10\nlr: 1.0e-6\n")
    cfg = load_config(["--config", path])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.loss.beta, cfg.optimizer.lr) == (512, 6, 10.0, 1e-6)
    # untouched by either: the default
    assert cfg.loss.gamma_beta_ratio == SimPOConfig().loss.gamma_beta_ratio

    cfg = load_config(["--config", path, "--hidden-size", "1024", "--beta", "2.5"])
    assert cfg.model.hidden_size == 1024  # the flag wins over the YAML file
    assert cfg.loss.beta == 2.5
    assert cfg.model.num_layers == 6  # still from the YAML file
    assert cfg.optimizer.lr == 1e-6


def test_flag_order_relative_to_config_does_not_matter(tmp_path):
    path = write_yaml(tmp_path, "seq_length: 512\n")
    assert load_config(["--seq-length", "128", "--config", path]).data.seq_length == 128
    assert load_config(["--config", path, "--seq-length", "128"]).data.seq_length == 128


def test_yaml_keys_may_use_dashes_or_underscores(tmp_path):
    path = write_yaml(tmp_path, "hidden-size: 384\nnum_attention_heads: 6\ngamma-beta-ratio: 0.3\n")
    cfg = load_config(["--config", path])
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.loss.gamma_beta_ratio) == (384, 6, 0.3)


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    path = write_yaml(tmp_path, "hidden_size: 64\nlearning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'learning_rate'") as info:
        load_config(["--config", path])
    assert path in str(info.value)


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "- hidden_size\n- 64\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(path)


def test_empty_yaml_file_sets_nothing(tmp_path):
    assert load_config(["--config", write_yaml(tmp_path, "# nothing\n")]) == SimPOConfig()


def test_yaml_floats_in_exponent_form_are_floats(tmp_path):
    # PyYAML reads "1e-6" (no dot) as a string; the config turns it into the float it means.
    path = write_yaml(tmp_path, "lr: 1e-6\nmin_lr: 0\nbeta: 10\n")
    assert yaml.safe_load(open(path))["lr"] == "1e-6"
    cfg = load_config(["--config", path])
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.min_lr == 0.0 and isinstance(cfg.optimizer.min_lr, float)
    assert cfg.loss.beta == 10.0 and isinstance(cfg.loss.beta, float)


def test_cli_values_are_typed():
    cfg = load_config(["--hidden-size", "128", "--lr", "3e-4", "--max-prompt-length", "100"])
    assert cfg.model.hidden_size == 128 and isinstance(cfg.model.hidden_size, int)
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.max_prompt_length == 100


# ------------------------------------------------------------------ list flags


def test_data_path_flag_takes_several_values():
    cfg = load_config(["--data-path", "0.7", "/data/a", "0.3", "/data/b", "--valid-data-path", "/data/v"])
    assert cfg.data.data_path == ["0.7", "/data/a", "0.3", "/data/b"]
    assert cfg.data.valid_data_path == ["/data/v"]


def test_data_path_in_yaml_as_string_or_list(tmp_path):
    as_string = write_yaml(tmp_path, "data_path: 0.7 /data/a 0.3 /data/b\n", "s.yaml")
    as_list = write_yaml(tmp_path, "data-path: [0.7, /data/a, 0.3, /data/b]\n", "l.yaml")
    single = write_yaml(tmp_path, "data_path: /data/a\n", "one.yaml")
    expected = ["0.7", "/data/a", "0.3", "/data/b"]
    assert load_config(["--config", as_string]).data.data_path == expected
    assert load_config(["--config", as_list]).data.data_path == expected  # numbers become strings
    assert load_config(["--config", single]).data.data_path == ["/data/a"]


def test_data_path_flag_replaces_the_yaml_list(tmp_path):
    path = write_yaml(tmp_path, "data_path: [/data/a, /data/b]\n")
    assert load_config(["--config", path, "--data-path", "/data/c"]).data.data_path == ["/data/c"]


def test_list_defaults_are_not_shared_between_configs():
    a, b = SimPOConfig(), SimPOConfig()
    a.data.data_path.append("x")
    assert b.data.data_path == []


# ------------------------------------------------------------------ booleans


@pytest.mark.parametrize(
    "name, default", [("average_log_prob", True), ("swiglu", True), ("bf16", False), ("mock_data", False)]
)
def test_boolean_flags_have_a_negative_form(name, default):
    flag = "--" + name.replace("_", "-")
    negative = "--no-" + name.replace("_", "-")
    assert load_config([]).to_flat()[name] is default
    assert load_config([flag]).to_flat()[name] is True
    assert load_config([negative]).to_flat()[name] is False
    assert load_config([flag, negative]).to_flat()[name] is False  # the last one wins


def test_cli_boolean_overrides_yaml_boolean(tmp_path):
    path = write_yaml(tmp_path, "average-log-prob: false\nswiglu: false\n")
    cfg = load_config(["--config", path])
    assert cfg.loss.average_log_prob is False and cfg.model.swiglu is False
    cfg = load_config(["--config", path, "--average-log-prob", "--swiglu"])
    assert cfg.loss.average_log_prob is True and cfg.model.swiglu is True
    cfg = load_config(["--config", write_yaml(tmp_path, "swiglu: true\n", "t.yaml"), "--no-swiglu"])
    assert cfg.model.swiglu is False


def test_derived_sizes_round_up_as_megatron_does():
    from simpo_megatron.config import ModelConfig

    for h in range(1, 500):
        # about 8/3 x hidden, rounded up to a multiple of 64 (the float formula, fine at these sizes)
        assert ModelConfig(hidden_size=h).derived_ffn_hidden_size() == math.ceil(8 * h / 3 / 64) * 64, h
    for vocab in (1, 255, 256, 257, 32000, 128256, 2**53 + 1):
        cfg = SimPOConfig.from_flat(vocab_size=vocab, make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
        padded = cfg.padded_vocab_size()
        assert padded % 256 == 0 and vocab <= padded < vocab + 256, vocab  # exact for vocabularies floats cannot hold


def test_no_swiglu_changes_the_default_ffn_size():
    assert load_config(["--hidden-size", "96"]).model.derived_ffn_hidden_size() == 256  # 8/3 x 96, to x64
    assert load_config(["--hidden-size", "96", "--no-swiglu"]).model.derived_ffn_hidden_size() == 384  # 4 x 96


# ------------------------------------------------------------------ the parser


def test_every_field_has_a_flag():
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in SimPOConfig().to_flat():
        assert "--" + name.replace("_", "-") in flags, name


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--loss-type", "kto"], "--loss-type"),
        (["--fp8-format", "e5m2"], "--fp8-format"),
        (["--lr-decay-style", "exponential"], "--lr-decay-style"),
        (["--hidden-size", "big"], "--hidden-size"),
        (["--hiden-size", "64"], "--hiden-size"),
    ],
)
def test_bad_command_line_values_exit_with_usage_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        load_config(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


# ------------------------------------------------------------------ validate: what passes


def test_base_config_validates_and_returns_itself():
    cfg = base()
    assert cfg.validate(1) is cfg


@pytest.mark.parametrize(
    "world, overrides, dp, micro_batches",
    [
        (1, {}, 1, 4),
        (8, dict(global_batch_size=16), 8, 1),
        (16, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, global_batch_size=32), 4, 4),
        (8, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2, global_batch_size=16), 4, 2),
        (
            4,
            dict(
                tensor_model_parallel_size=4,
                num_query_groups=4,
                sequence_parallel=True,
                transformer_impl="transformer_engine",
            ),
            1,
            4,
        ),
        (2, dict(tensor_model_parallel_size=2, hidden_size=200, kv_channels=32), 1, 4),
    ],
)
def test_valid_layouts(world, overrides, dp, micro_batches):
    cfg = base(**overrides).validate(world)
    assert cfg.data_parallel_size(world) == dp
    assert cfg.num_micro_batches(world) == micro_batches


def test_simpo_knob_edges_are_valid():
    base(label_smoothing=0.5).validate(1)
    base(label_smoothing=0.0, loss_type="hinge").validate(1)
    base(sft_weight=0.0, gamma_beta_ratio=0.0).validate(1)
    base(average_log_prob=False, beta=1e-3).validate(1)


# ------------------------------------------------------------------ validate: errors


def check_error(cfg: SimPOConfig, world: int, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(world)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "world, overrides, needles",
    [
        (
            6,
            dict(tensor_model_parallel_size=4),
            ["world size 6", "--tensor-model-parallel-size (4)", "--pipeline-model-parallel-size (1)"],
        ),
        (
            6,
            dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
            ["world size 6", "--tensor-model-parallel-size (2)", "--pipeline-model-parallel-size (2)"],
        ),
        (3, dict(pipeline_model_parallel_size=2), ["world size 3", "--pipeline-model-parallel-size (2)"]),
    ],
    ids=["tp", "tp_x_pp", "pp"],
)
def test_world_size_not_divisible_by_model_parallel_size(world, overrides, needles):
    check_error(base(**overrides), world, *needles)


def test_heads_not_divisible_by_tp():
    check_error(
        base(num_attention_heads=6, hidden_size=384, tensor_model_parallel_size=4),
        4,
        "--num-attention-heads (6)",
        "--tensor-model-parallel-size (4)",
    )


def test_query_groups_not_divisible_by_tp():
    check_error(
        base(num_attention_heads=8, num_query_groups=2, tensor_model_parallel_size=4),
        4,
        "--num-query-groups (2)",
        "--tensor-model-parallel-size (4)",
    )


def test_default_query_groups_are_the_heads():
    # Without --num-query-groups the groups are the heads, checked as such.
    base(num_attention_heads=8, tensor_model_parallel_size=8, global_batch_size=8).validate(8)


def test_heads_not_divisible_by_query_groups():
    check_error(
        base(num_attention_heads=8, num_query_groups=3), 1, "--num-attention-heads (8)", "--num-query-groups (3)"
    )


def test_hidden_not_divisible_by_heads_needs_kv_channels():
    check_error(base(hidden_size=100, num_attention_heads=8), 1, "--hidden-size (100)", "--kv-channels")
    base(hidden_size=100, num_attention_heads=8, kv_channels=16).validate(1)


def test_layers_not_divisible_by_pp():
    check_error(
        base(num_layers=6, pipeline_model_parallel_size=4), 4, "--num-layers (6)", "--pipeline-model-parallel-size (4)"
    )


def test_layers_per_stage_not_divisible_by_virtual_stage():
    # 8 layers over PP=2: 4 per stage, which 3-layer virtual stages do not divide.
    check_error(
        base(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3),
        2,
        "layers per pipeline stage (4)",
        "--num-layers-per-virtual-pipeline-stage (3)",
    )


def test_virtual_pipeline_needs_pipeline_parallelism():
    check_error(
        base(num_layers_per_virtual_pipeline_stage=2),
        1,
        "--num-layers-per-virtual-pipeline-stage",
        "--pipeline-model-parallel-size > 1",
    )


def test_interleaved_schedule_needs_micro_batches_a_multiple_of_pp():
    # PP=2, virtual stages of 2 layers, 3 micro-batches of 4 pairs (gbs 12, DP 1).
    check_error(
        base(
            num_layers=8,
            pipeline_model_parallel_size=2,
            num_layers_per_virtual_pipeline_stage=2,
            micro_batch_size=4,
            global_batch_size=12,
        ),
        2,
        "micro-batches (3)",
        "--pipeline-model-parallel-size (2)",
    )


@pytest.mark.parametrize(
    "world, overrides, needles",
    [
        (
            1,
            dict(global_batch_size=10, micro_batch_size=4),
            ["--global-batch-size (10)", "--micro-batch-size (4)", "data-parallel size (1)"],
        ),
        (
            4,
            dict(global_batch_size=8, micro_batch_size=4),
            ["--global-batch-size (8)", "--micro-batch-size (4)", "data-parallel size (4)"],
        ),
        (
            8,
            dict(global_batch_size=10, micro_batch_size=1, tensor_model_parallel_size=2),
            ["--global-batch-size (10)", "--micro-batch-size (1)", "data-parallel size (4)"],
        ),
    ],
    ids=["dp1", "dp4", "tp2_dp4"],
)
def test_global_batch_not_divisible_by_micro_batch_times_dp(world, overrides, needles):
    check_error(base(**overrides), world, *needles)


@pytest.mark.parametrize(
    "name",
    [
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "micro_batch_size",
        "global_batch_size",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "train_iters",
        "log_interval",
    ],
)
def test_sizes_must_be_positive(name):
    check_error(base(**{name: 0}), 1, "--" + name.replace("_", "-") + " must be >= 1")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (dict(context_parallel_size=2), ["--context-parallel-size"]),
        (dict(sequence_parallel=True), ["--sequence-parallel", "--tensor-model-parallel-size"]),
        (dict(bf16=True, fp16=True), ["--bf16", "--fp16"]),
        (dict(seq_length=128, max_prompt_length=128), ["--max-prompt-length (128)", "--seq-length"]),
        (dict(max_prompt_length=0), ["--max-prompt-length (0)"]),
        (dict(lr_warmup_fraction=0.1, lr_warmup_iters=10), ["--lr-warmup-fraction", "--lr-warmup-iters"]),
        (dict(lr=1e-6, min_lr=1e-5), ["--min-lr", "--lr"]),
        (dict(clip_grad=-1.0), ["--clip-grad"]),
        (dict(use_distributed_optimizer=True, optimizer="sgd"), ["--use-distributed-optimizer", "--optimizer adam"]),
        (dict(overlap_param_gather=True), ["--overlap-param-gather", "--use-distributed-optimizer"]),
        (dict(fp8_format="hybrid"), ["--fp8-format", "--transformer-impl transformer_engine"]),
        (dict(fp8_param_gather=True), ["--fp8-param-gather", "--fp8-format"]),
        (dict(mock_data=False), ["--data-path", "--mock-data"]),
        (dict(data_path=["/data/a"]), ["--data-path", "--mock-data"]),
        (dict(mock_data=False, data_path=["/data/a"]), ["--data-path", "--tokenizer-model"]),
        (dict(save_interval=0), ["--save-interval"]),
        (dict(eval_only=True), ["--eval-only", "--load"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_other_inconsistent_settings(overrides, needles):
    check_error(base(**overrides), 1, *needles)


def test_sequence_parallel_needs_seq_length_divisible_by_tp():
    check_error(
        base(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=101),
        2,
        "--seq-length (101)",
        "--tensor-model-parallel-size (2)",
        "--sequence-parallel",
    )


def test_sequence_parallel_on_the_local_layers_needs_rmsnorm_and_moe_with_tp_needs_it():
    # Without Apex, megatron-core's torch LayerNorm refuses sequence parallelism; RMSNorm is ours.
    check_error(
        base(tensor_model_parallel_size=2, sequence_parallel=True, normalization="LayerNorm"),
        2,
        "--sequence-parallel",
        "--normalization RMSNorm",
    )
    base(tensor_model_parallel_size=2, sequence_parallel=True).validate(2)
    base(tensor_model_parallel_size=2, sequence_parallel=True, transformer_impl="transformer_engine").validate(2)
    check_error(base(tensor_model_parallel_size=2, num_experts=4), 2, "--sequence-parallel", "mixture-of-experts")
    base(tensor_model_parallel_size=2, num_experts=4, sequence_parallel=True).validate(2)


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("transformer_impl", "te", "--transformer-impl"),
        ("normalization", "ScaleNorm", "--normalization"),
        ("fp8_recipe", "fast", "--fp8-recipe"),
        ("tokenizer_type", "GPT2BPETokenizer", "--tokenizer-type"),
        ("sft_loss_form", "sequence", "--sft-loss-form"),
    ],
)
def test_a_value_outside_the_choices_from_yaml_is_an_error_naming_the_flag(tmp_path, key, value, flag):
    # argparse checks choices on the command line only; validation checks them whatever the source.
    path = write_yaml(tmp_path, f"mock_data: true\n{key}: {value}\n")
    with pytest.raises(ConfigError, match=f"^{flag} must be one of .*got '{value}'"):
        load_config(["--config", path]).validate(1)


def test_choices_come_from_the_modules_that_define_them():
    from simpo_megatron import losses
    from simpo_megatron.data.tokenizers import TOKENIZER_TYPES

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["loss_type"].choices) == tuple(losses.LOSS_TYPES)
    assert tuple(actions["tokenizer_type"].choices) == tuple(TOKENIZER_TYPES)


def test_help_lists_the_flags_by_section():
    text = build_parser().format_help()
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    for section in ("model", "parallel", "data", "loss", "optimizer", "checkpoint", "logging"):
        assert section in headings, headings
    groups = text[text.index("\nmodel:") :]
    assert groups.index("--hidden-size") < groups.index("\nparallel:") < groups.index("--tensor-model-parallel-size")
    assert "(default: None)" not in groups.split("--ffn-hidden-size")[1].split("--num-attention-heads")[0]


def test_sections_are_frozen_and_replace_returns_a_copy():
    import dataclasses

    cfg = base()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = cfg.model
    changed = cfg.replace(hidden_size=512, beta=3.0)
    assert (changed.model.hidden_size, changed.loss.beta) == (512, 3.0)
    assert (cfg.model.hidden_size, cfg.loss.beta) == (256, 2.0)


# ------------------------------------------------------------------ validate: SimPO knobs


@pytest.mark.parametrize(
    "overrides, flag, detail",
    [
        (dict(loss_type="kto"), "--loss-type", "'kto'"),
        (dict(beta=0.0), "--beta", "> 0"),
        (dict(beta=-2.0), "--beta", "> 0"),
        (dict(label_smoothing=0.6), "--label-smoothing", "[0, 0.5]"),
        (dict(label_smoothing=-0.1), "--label-smoothing", "[0, 0.5]"),
        (dict(loss_type="hinge", label_smoothing=0.1), "--label-smoothing", "hinge"),
        (dict(sft_weight=-0.5), "--sft-weight", ">= 0"),
        (dict(loss_type="ipo", label_smoothing=0.1), "--label-smoothing", "'ipo'"),
        (dict(loss_type="ipo", rdpo_alpha=0.5), "--rdpo-alpha", "'dpo' only"),
        (dict(loss_type="dpo", rdpo_alpha=-1.0), "--rdpo-alpha", ">= 0"),
    ],
    ids=["loss_type", "beta0", "beta_neg", "ls_high", "ls_low", "ls_hinge", "sft", "ls_ipo", "rdpo_ipo", "rdpo_neg"],
)
def test_simpo_knob_errors_name_the_flag(overrides, flag, detail):
    message = check_error(base(**overrides), 1, flag, detail)
    assert message.startswith(flag), message
    # The message speaks in flags, not in Python argument names.
    assert not re.search(r"(?<!-)\b(loss_type|label_smoothing|sft_weight)\b", message), message


@pytest.mark.parametrize("overrides", [dict(sft_weight=0.0), dict(sft_weight=1.0, sft_loss_form="pair")])
def test_sft_on_prompt_needs_the_token_level_sft_term(overrides):
    check_error(base(loss_type="orpo", sft_on_prompt=True, **overrides), 1, "--sft-on-prompt", "--sft-weight > 0")
    base(loss_type="orpo", sft_weight=1.0, sft_on_prompt=True).validate(1)


def test_label_smoothing_with_hinge_names_loss_type_too():
    check_error(base(loss_type="hinge", label_smoothing=0.1), 1, "--label-smoothing", "--loss-type")


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "dpo-norm"])
def test_reference_based_losses_need_preprocessed_data_and_a_reference(loss_type):
    check_error(base(loss_type=loss_type, load="ckpt"), 1, f"--loss-type {loss_type}", "--data-path")
    data = dict(mock_data=False, data_path=["d"], tokenizer_type="SentencePieceTokenizer", tokenizer_model="t")
    check_error(base(loss_type=loss_type, **data), 1, "--load", "--ref-load")
    for reference in (dict(load="ckpt"), dict(ref_load="ref")):
        base(loss_type=loss_type, **data, **reference).validate(1)
    base(loss_type="orpo", **data).validate(1)  # reference-free


def test_simpo_knob_errors_from_yaml(tmp_path):
    # argparse rejects a bad --loss-type on the command line; from a YAML file it reaches validate().
    path = write_yaml(tmp_path, "mock_data: true\nloss_type: kto\n")
    with pytest.raises(ConfigError, match="^--loss-type must be one of"):
        load_config(["--config", path]).validate(1)
    path = write_yaml(tmp_path, "mock-data: true\nlabel-smoothing: 0.7\n", "ls.yaml")
    with pytest.raises(ConfigError, match="^--label-smoothing must be in"):
        load_config(["--config", path]).validate(1)


@pytest.mark.parametrize("name", ["no_load_optim", "no_load_rng"])
def test_megatron_negative_switches_are_plain_flags(name):
    flag = "--" + name.replace("_", "-")
    assert load_config([flag]).to_flat()[name] is True
    assert load_config([]).to_flat()[name] is False


@pytest.mark.parametrize("flag", ["pad_to_multiple_of", "logprob_chunk_size"])
def test_padding_and_chunk_flags_must_be_non_negative(flag):
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} must be >= 0"):
        SimPOConfig.from_flat(mock_data=True, **{flag: -1}).validate(1)
    SimPOConfig.from_flat(mock_data=True, **{flag: 0}).validate(1)
