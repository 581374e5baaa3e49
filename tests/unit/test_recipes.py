"""examples/configs/*.yaml: every recipe parses and validates; the paper recipes (SimPO, and
the DPO baselines) carry the hyperparameters the SimPO repository publishes and the model
shapes of their architectures.

validate() only checks the flags, so a fake --data-path (or --mock-data) is enough: nothing
is read, no process group is started. A reference-based recipe (DPO) also needs a reference
model (a fake --load) and refuses --mock-data: its reference scores are stored per data prefix.
"""

import functools
import glob
import os

import pytest

from simpo_megatron.config import ConfigError, SimPOConfig, load_config
from simpo_megatron.hf.config_mapping import MODEL_FIELDS, hf_config_to_overrides
from simpo_megatron.losses import get_loss

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")
ALL = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
FAKE_DATA = [
    "--data-path",
    "/nonexistent/train_prefix",
    "--valid-data-path",
    "/nonexistent/valid_prefix",
    "--tokenizer-type",
    "HuggingFaceTokenizer",
    "--tokenizer-model",
    "/nonexistent/tokenizer",
]
FAKE_LOAD = ["--load", "/nonexistent/hf_model"]  # the reference of a reference-based loss

# The SimPO repository's training_configs/*.yaml (princeton-nlp/SimPO), in this project's flags
# (Llama-3.1 takes the Llama-3 v0.2 recipe: the repository has none of its own). Common to all:
# bf16, cosine decay, warmup_ratio 0.1, one epoch, max_length 2048,
# max_prompt_length 1800, 2 pairs x 16 accumulation steps x 4 processes = 128 pairs per step.
PUBLISHED = {
    "llama3-8b-instruct.yaml": dict(
        source="training_configs/llama-3-8b-instruct-simpo-v2.yaml", beta=10.0, gamma_beta_ratio=0.3, lr=1e-6
    ),
    "llama3.1-8b-instruct.yaml": dict(
        source="training_configs/llama-3-8b-instruct-simpo-v2.yaml", beta=10.0, gamma_beta_ratio=0.3, lr=1e-6
    ),
    "mistral-7b-instruct.yaml": dict(
        source="training_configs/mistral-7b-instruct-simpo.yaml", beta=2.5, gamma_beta_ratio=0.1, lr=5e-7
    ),
    "gemma2-9b-it.yaml": dict(
        source="training_configs/gemma-2-9b-it-simpo.yaml", beta=10.0, gamma_beta_ratio=0.5, lr=8e-7
    ),
}
# The DPO baselines: the SimPO repository's README.md table "For DPO, the best hyperparameters
# for each setting" (beta, learning rate; the row named here), on the setup of the SimPO recipe
# of the same model and data (128 pairs per step, max_length 2048, cosine, warmup 0.1, one epoch).
PUBLISHED_DPO = {
    "llama3-8b-instruct-dpo.yaml": dict(
        row="Llama3-Instruct v0.2", simpo="llama3-8b-instruct.yaml", beta=0.01, lr=3e-7
    ),
    "mistral-7b-instruct-dpo.yaml": dict(row="Mistral-Instruct", simpo="mistral-7b-instruct.yaml", beta=0.01, lr=5e-7),
}
PAPER = sorted(PUBLISHED)
DPO = sorted(PUBLISHED_DPO)

# config.json of the Hugging Face models the recipes start from (the fields that matter).
HF_CONFIGS = {
    "llama3-8b-instruct.yaml": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "mistral-7b-instruct.yaml": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
}
HF_CONFIGS["llama3-8b-instruct-dpo.yaml"] = HF_CONFIGS["llama3-8b-instruct.yaml"]
HF_CONFIGS["mistral-7b-instruct-dpo.yaml"] = HF_CONFIGS["mistral-7b-instruct.yaml"]
HF_CONFIGS["llama3.1-8b-instruct.yaml"] = {
    **HF_CONFIGS["llama3-8b-instruct.yaml"],
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
HF_CONFIGS["gemma2-9b-it.yaml"] = {
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
    "tie_word_embeddings": True,
}

HF_CONFIGS["qwen3-8b-simpo.yaml"] = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
}
HF_CONFIGS["qwen3-30b-a3b-simpo.yaml"] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
}


@functools.cache
def recipe(name: str, *extra: str) -> SimPOConfig:
    """The parsed recipe (cached: parsing is the slow part; no test changes a config)."""
    return load_config(["--config", os.path.join(CONFIGS, name), *extra])


def model_parallel(cfg: SimPOConfig) -> int:
    """The smallest world the recipe runs on: TP x PP, times EP (which splits data-parallel ranks)."""
    par = cfg.parallel
    return par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.expert_model_parallel_size


def needs_reference(name: str) -> bool:
    return get_loss(recipe(name, "--mock-data").loss.loss_type).needs_reference


def run_flags(name: str) -> tuple[str, ...]:
    """What a run of the recipe adds on the command line (data; a reference for DPO)."""
    return (*FAKE_DATA, *FAKE_LOAD) if needs_reference(name) else tuple(FAKE_DATA)


def test_the_recipes_exist():
    names = {os.path.basename(p) for p in ALL}
    assert {"tiny.yaml", *PUBLISHED, *PUBLISHED_DPO} <= names
    assert {n for n in names if needs_reference(n)} == set(PUBLISHED_DPO)


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
@pytest.mark.parametrize("data", [["--mock-data"], FAKE_DATA], ids=["mock", "data_path"])
def test_every_recipe_parses_and_validates_on_its_model_parallel_size(path, data):
    name = os.path.basename(path)
    if needs_reference(name):
        if data == FAKE_DATA:
            cfg = recipe(name, *data)
            with pytest.raises(ConfigError, match="needs a reference model: --load"):
                cfg.validate(model_parallel(cfg))
        cfg = recipe(name, *data, *FAKE_LOAD)
        if data != FAKE_DATA:
            with pytest.raises(ConfigError, match="--loss-type dpo scores preprocessed data .* use --data-path"):
                cfg.validate(model_parallel(cfg))
            return
    else:
        cfg = recipe(name, *data)
    assert cfg.validate(model_parallel(cfg)) is cfg


@pytest.mark.parametrize("name", PAPER + DPO)
@pytest.mark.parametrize("dp", [1, 2, 4, 8, 16, 32])
def test_paper_recipes_validate_on_multi_node_worlds(name, dp):
    cfg = recipe(name, *run_flags(name))
    world = dp * model_parallel(cfg)  # e.g. 8 x TP x PP GPUs
    cfg.validate(world)
    assert cfg.data_parallel_size(world) == dp
    assert cfg.num_micro_batches(world) * cfg.data.micro_batch_size * dp == 128


def test_tiny_recipe_validates_as_the_launcher_runs_it():
    cfg = recipe("tiny.yaml", "--mock-data")
    cfg.validate(2)  # bash examples/pretrain_simpo.sh: 2 processes, TP=2
    assert cfg.parallel.tensor_model_parallel_size == 2


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_carry_the_published_hyperparameters(name):
    cfg = recipe(name, "--mock-data")
    published = PUBLISHED[name]
    assert cfg.loss.loss_type == "sigmoid"
    assert cfg.loss.beta == published["beta"]
    assert cfg.loss.gamma_beta_ratio == published["gamma_beta_ratio"]
    assert cfg.optimizer.lr == published["lr"]
    assert cfg.loss.label_smoothing == 0.0 and cfg.loss.sft_weight == 0.0 and cfg.loss.average_log_prob
    assert cfg.data.global_batch_size == 128
    assert (cfg.data.seq_length, cfg.data.max_prompt_length) == (2048, 1800)
    assert cfg.model.bf16 and not cfg.model.fp16
    assert cfg.optimizer.lr_decay_style == "cosine" and cfg.optimizer.min_lr == 0.0
    assert cfg.optimizer.lr_warmup_fraction == 0.1 and cfg.optimizer.lr_warmup_iters == 0
    # HF AdamW (adamw_torch) defaults and Trainer's gradient clipping.
    opt = cfg.optimizer
    assert (opt.optimizer, opt.adam_beta1, opt.adam_beta2, opt.adam_eps) == ("adam", 0.9, 0.999, 1e-8)
    assert cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.clip_grad == 1.0
    assert cfg.optimizer.seed == 42
    # One epoch of ~60k UltraFeedback pairs.
    assert 0.95 <= cfg.optimizer.train_iters * cfg.data.global_batch_size / 60_000 <= 1.0


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_cite_their_source(name):
    header = open(os.path.join(CONFIGS, name)).read().split("\n\n")[0]
    assert "princeton-nlp/SimPO" in header
    assert PUBLISHED[name]["source"] in header


@pytest.mark.parametrize("name", DPO)
def test_dpo_recipes_carry_the_published_hyperparameters(name):
    cfg = recipe(name, *run_flags(name))
    published = PUBLISHED_DPO[name]
    assert cfg.loss.loss_type == "dpo"
    assert (cfg.loss.beta, cfg.optimizer.lr) == (published["beta"], published["lr"])
    # Plain DPO: no cDPO label smoothing, no R-DPO length term, no SFT term.
    assert (cfg.loss.label_smoothing, cfg.loss.rdpo_alpha, cfg.loss.sft_weight) == (0.0, 0.0, 0.0)
    assert cfg.checkpoint.ref_load is None  # the reference is the model --load starts from
    cfg.validate(8)  # the header's example: 8 GPUs, TP=2 x DP=4
    assert cfg.data_parallel_size(8) == 4
    assert cfg.num_micro_batches(8) * cfg.data.micro_batch_size * 4 == 128
    # Everything else is the SimPO recipe of the same model and data: the model, the layout,
    # the batches and truncation, the optimizer and schedule, precision, seed, evaluation.
    simpo = recipe(published["simpo"], *FAKE_DATA, *FAKE_LOAD).to_flat()
    loss_knobs = {
        "loss_type",
        "beta",
        "gamma_beta_ratio",
        "label_smoothing",
        "rdpo_alpha",
        "sft_weight",
        "average_log_prob",
        "lr",
    }
    differs = {k for k, v in cfg.to_flat().items() if simpo[k] != v}
    assert differs <= loss_knobs, differs - loss_knobs
    assert simpo["global_batch_size"] == 128 and (simpo["seq_length"], simpo["max_prompt_length"]) == (2048, 1800)


@pytest.mark.parametrize("name", DPO)
def test_dpo_recipes_cite_their_source(name):
    header = open(os.path.join(CONFIGS, name)).read().split("\n\n")[0]
    assert "princeton-nlp/SimPO" in header and "README.md" in header
    assert f'row "{PUBLISHED_DPO[name]["row"]}"' in header
    assert "Not published for DPO" in header  # and what was chosen instead


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_recipes_match_what_the_hf_importer_reads(name):
    """The model shape in the recipe is the one --load of the HF model directory sets."""
    cfg = recipe(name, *run_flags(name))
    overrides = hf_config_to_overrides(HF_CONFIGS[name], seq_length=cfg.data.seq_length)
    assert {k: getattr(cfg.model, k) for k in MODEL_FIELDS} == {k: overrides[k] for k in MODEL_FIELDS}
    # Megatron pads the vocabulary to a multiple of 128 x TP (Qwen3's 151936 to 152064 at TP=2,
    # none at TP=1; the padded rows are masked out of the softmax); the others need no padding.
    multiple = 128 * cfg.parallel.tensor_model_parallel_size
    assert cfg.padded_vocab_size() == -(-cfg.model.vocab_size // multiple) * multiple
    padded = cfg.parallel.tensor_model_parallel_size > 1 and "qwen" in name
    assert (cfg.padded_vocab_size() == cfg.model.vocab_size) == (not padded)


def test_gemma2_recipe_is_gemma2():
    """Gemma-2-9B's sizes and every Gemma-2 feature (the importer test above pins them to the
    config.json); the Transformer Engine layers, which cannot soft-cap, are refused at start."""
    cfg = recipe("gemma2-9b-it.yaml", *FAKE_DATA)
    cfg.validate(8 * model_parallel(cfg))
    assert (
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.model.num_attention_heads,
        cfg.model.num_query_groups,
        cfg.model.kv_channels,
        cfg.model.vocab_size,
    ) == (42, 3584, 16, 8, 256, 256000)
    assert cfg.model.untie_embeddings_and_output_weights is False
    assert cfg.model.geglu and cfg.model.sandwich_norm and cfg.model.apply_layernorm_1p and cfg.model.scale_embeddings
    assert (cfg.model.attn_logit_softcapping, cfg.model.final_logit_softcapping) == (50.0, 30.0)
    assert (cfg.model.sliding_window, cfg.model.window_attn_skip_freq, cfg.model.softmax_scale) == (4096, 2, 256**-0.5)
    te = recipe("gemma2-9b-it.yaml", *FAKE_DATA, "--transformer-impl", "transformer_engine")
    with pytest.raises(ConfigError, match="--attn-logit-softcapping .* needs --transformer-impl local"):
        te.validate(8 * model_parallel(te))


def test_moe_recipe_is_qwen3_30b_a3b_and_fits_two_nodes():
    """The MoE recipe's router loss is HF's coefficient (on, as TRL adds it with
    output_router_logits); by the memory estimate it fits 2 nodes of 8 x 80 GB, not one."""
    from simpo_megatron.memory_estimate import GIB, estimate_memory, memory_warning

    cfg = recipe("qwen3-30b-a3b-simpo.yaml", *FAKE_DATA)
    assert cfg.model.moe_aux_loss_coeff == HF_CONFIGS["qwen3-30b-a3b-simpo.yaml"]["router_aux_loss_coef"]
    assert cfg.loss.beta == 10.0 and cfg.loss.gamma_beta_ratio == 0.3 and cfg.optimizer.lr == 1e-6
    cfg.validate(16)
    assert cfg.data_parallel_size(16) == 16 and cfg.num_micro_batches(16) * 16 == 128
    assert memory_warning(cfg, 16, 80 * GIB) is None
    assert memory_warning(cfg.replace().validate(8), 8, 80 * GIB) is not None
    # Each rank holds the dense part and 1/8 of the experts, in bf16 (norms in fp32), counted
    # here from config.json; the whole is Qwen3-30B-A3B's published 30.5B parameters.
    hf = HF_CONFIGS["qwen3-30b-a3b-simpo.yaml"]
    h, layers, d = hf["hidden_size"], hf["num_hidden_layers"], hf["head_dim"]
    q, kv = hf["num_attention_heads"] * d, hf["num_key_value_heads"] * d
    experts = layers * hf["num_experts"] * 3 * h * hf["moe_intermediate_size"]
    norms = layers * (2 * h + 2 * d) + h
    dense = layers * (h * (q + 2 * kv) + q * h + hf["num_experts"] * h) + 2 * hf["vocab_size"] * h + norms
    assert (experts + dense) / 1e9 == pytest.approx(30.5, abs=0.05)
    fp32 = layers * 2 * h + h  # torch's norms keep fp32 weights; the QK norms are bf16
    assert estimate_memory(cfg, 16).weights == (dense + experts // 8 - fp32) * 2 + fp32 * 4


def test_llama31_recipe_scales_rope_by_8():
    cfg = recipe("llama3.1-8b-instruct.yaml", "--mock-data")
    assert cfg.model.use_rope_scaling and cfg.model.rope_scaling_factor == 8.0
    assert cfg.model.max_position_embeddings == 131072


def test_command_line_overrides_a_recipe():
    cfg = recipe(
        "llama3-8b-instruct.yaml",
        "--mock-data",
        "--beta",
        "2.5",
        "--gamma-beta-ratio",
        "0.55",
        "--tensor-model-parallel-size",
        "4",
    )
    assert (cfg.loss.beta, cfg.loss.gamma_beta_ratio, cfg.parallel.tensor_model_parallel_size) == (2.5, 0.55, 4)
    assert cfg.optimizer.lr == 1e-6
    cfg.validate(32)
