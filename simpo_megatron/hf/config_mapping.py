"""Hugging Face config.json <-> the model section of a SimPOConfig (Llama, Mistral, Qwen2, Qwen3,
Gemma-2; the mixtures of experts Qwen3-MoE and Mixtral).

Pure functions of dicts and configs. ``hf_config_to_overrides`` reads a config.json (of
transformers 4 or 5) into model settings; ``to_hf_config`` writes the config.json of a model,
keeping the other entries of the original; ``hf_model_type`` says which HF architecture a
model is. ``model_config_dict`` / ``model_config_from_dict`` are the model's shape as a
checkpoint records it. Anything that does not fit raises ``HFConversionError`` naming the
config field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simpo_megatron.config import ModelConfig, SimPOConfig
from simpo_megatron.hf.errors import HFConversionError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "qwen3_moe", "mixtral")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
_QK_NORM = ("qwen3", "qwen3_moe")  # RMSNorm on each query and key head
_TIED_BY_DEFAULT = {"gemma2"}  # transformers' default tie_word_embeddings per model type

# The model fields that describe its shape (what a checkpoint must record).
MODEL_FIELDS = ModelConfig.architecture_fields()

# megatron-core 0.16.1 fixes these Llama-3 RoPE scaling parameters (RotaryEmbedding._apply_scaling
# takes only the factor from GPTModel); Llama-3.1 (factor 8) and 3.2 (factor 32) use exactly these.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise HFConversionError(f"config.json: missing field {key!r}")
    return hf_config[key]


# ----------------------------------------------------------------------------- config.json -> model


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) from a transformers 4 or 5 config."""
    params = dict(hf_config.get("rope_scaling") or {})
    params.update(hf_config.get("rope_parameters") or {})  # transformers 5 keeps rope_theta here too
    theta = hf_config.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if (hf_config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise HFConversionError("config.json: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise HFConversionError(
            f"config.json: rope_scaling type {rope_type!r} is not supported (megatron-core supports "
            "'llama3' scaling only)"
        )
    for key, fixed in _LLAMA3_FIXED.items():
        if params.get(key) != fixed:
            raise HFConversionError(
                f"config.json: rope_scaling {key}={params.get(key)!r}; megatron-core 0.16.1 supports "
                f"llama3 scaling with {key}={fixed} only"
            )
    return theta, float(_require(params, "factor"))


def _window_layers(hf_config: Mapping[str, Any]) -> list[bool]:
    """Which layers use the sliding window (transformers 5 ``layer_types``, or the 4.x rules)."""
    n = _require(hf_config, "num_hidden_layers")
    if hf_config.get("sliding_window") is None:
        return [False] * n
    layer_types = hf_config.get("layer_types")
    if layer_types is not None:
        return [t == "sliding_attention" for t in layer_types]
    model_type = hf_config.get("model_type")
    if model_type == "gemma2":
        return [i % 2 == 0 for i in range(n)]
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):  # transformers 4: layers from max_window_layers on use the window
        first = hf_config.get("max_window_layers", 0) if hf_config.get("use_sliding_window") else n
        return [i >= first for i in range(n)]
    return [True] * n


def sliding_window(hf_config: Mapping[str, Any]) -> int | None:
    """The attention window the HF model uses on some layer, or None for full causal attention."""
    return hf_config.get("sliding_window") if any(_window_layers(hf_config)) else None


def _window_fields(hf_config: Mapping[str, Any], seq_length: int | None) -> dict[str, Any]:
    """--sliding-window / --window-attn-skip-freq for the HF layer pattern.

    All layers windowed, or every other one from layer 0 (Gemma-2), map exactly. Another
    pattern (some Qwen2) is refused unless the window covers --seq-length, where every
    layer attends to all previous tokens anyway.
    """
    layers = _window_layers(hf_config)
    window = hf_config.get("sliding_window")
    if not any(layers):
        return dict(sliding_window=None, window_attn_skip_freq=None)
    if all(layers):
        return dict(sliding_window=int(window), window_attn_skip_freq=None)
    if layers == [i % 2 == 0 for i in range(len(layers))]:
        return dict(sliding_window=int(window), window_attn_skip_freq=2)
    if seq_length is not None and window < seq_length:
        raise HFConversionError(
            f"config.json: sliding_window={window} on the layers {[i for i, w in enumerate(layers) if w]} "
            f"only, a pattern --window-attn-skip-freq cannot express, is smaller than --seq-length {seq_length}"
        )
    return dict(sliding_window=None, window_attn_skip_freq=None)


def hf_config_to_overrides(hf_config: Mapping[str, Any], seq_length: int | None = None) -> dict[str, Any]:
    """The SimPOConfig model fields of an HF config.json (``seq_length``: of the run, if known)."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(
            f"config.json: model_type {model_type!r} (architectures {hf_config.get('architectures')}) "
            f"is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    gemma = model_type == "gemma2"
    act_key = "hidden_activation" if gemma and "hidden_activation" in hf_config else "hidden_act"
    act = hf_config.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise HFConversionError(
            f"config.json: {act_key} {act!r} is not supported for {model_type} "
            f"({'gelu_pytorch_tanh' if gemma else 'silu'} only)"
        )
    if hf_config.get("mlp_bias"):
        raise HFConversionError("config.json: mlp_bias=true is not supported")
    if model_type != "qwen2" and hf_config.get("attention_bias"):
        raise HFConversionError(
            "config.json: attention_bias=true is not supported: it adds a bias to the output "
            "projection too, which megatron's add_qkv_bias does not cover"
        )
    heads = _require(hf_config, "num_attention_heads")
    hidden = _require(hf_config, "hidden_size")
    theta, scaling = _rope(hf_config)
    if float(theta) != int(theta):
        raise HFConversionError(f"config.json: rope_theta {theta} is not an integer (--rotary-base is)")
    scalar = hf_config.get("query_pre_attn_scalar") if gemma else None
    moe = _moe_fields(hf_config) if model_type in MOE_MODEL_TYPES else dict(_DENSE)
    return dict(
        num_layers=_require(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_require(hf_config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("head_dim") or hidden // heads,
        vocab_size=_require(hf_config, "vocab_size"),
        max_position_embeddings=hf_config.get("max_position_embeddings"),
        normalization="RMSNorm",
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        swiglu=not gemma,
        rotary_base=int(theta),
        rotary_percent=1.0,
        use_rope_scaling=scaling is not None,
        rope_scaling_factor=scaling if scaling is not None else 8.0,
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT),
        add_qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type in _QK_NORM,
        geglu=gemma,
        apply_layernorm_1p=gemma,
        sandwich_norm=gemma,
        scale_embeddings=gemma,
        softmax_scale=float(scalar) ** -0.5 if scalar is not None else None,
        attn_logit_softcapping=hf_config.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=hf_config.get("final_logit_softcapping") if gemma else None,
        **_window_fields(hf_config, seq_length),
        **moe,
    )


# The mixture-of-experts fields of a dense model: their defaults.
_DENSE = {
    name: ModelConfig.__dataclass_fields__[name].default
    for name in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax")
}


def _moe_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE or Mixtral config.json.

    The load-balancing loss weight is ``router_aux_loss_coef`` when ``output_router_logits``
    is on (HF and TRL add the loss only then), else 0.
    """
    mixtral = hf_config["model_type"] == "mixtral"
    if not mixtral:
        if hf_config.get("mlp_only_layers") or hf_config.get("decoder_sparse_step", 1) != 1:
            raise HFConversionError(
                "config.json: mlp_only_layers / decoder_sparse_step != 1 (dense layers among the MoE "
                "layers) is not supported: every layer must be a MoE layer"
            )
    elif hf_config.get("router_jitter_noise"):
        raise HFConversionError("config.json: router_jitter_noise != 0 is not supported")
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts too
    experts = hf_config.get("num_local_experts") or _require(hf_config, "num_experts")
    topk = _require(hf_config, "num_experts_per_tok")
    if topk > experts:
        raise HFConversionError(f"config.json: num_experts_per_tok={topk} > the {experts} experts")
    renormalize = mixtral or bool(hf_config.get("norm_topk_prob", False))
    coef = float(hf_config.get("router_aux_loss_coef") or 0.0) if hf_config.get("output_router_logits") else 0.0
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=_require(hf_config, "intermediate_size" if mixtral else "moe_intermediate_size"),
        moe_router_topk=topk,
        moe_router_pre_softmax=not renormalize,
        moe_aux_loss_coeff=coef,
    )


# ----------------------------------------------------------------------------- model -> config.json


def hf_model_type(model: ModelConfig, base: Mapping[str, Any] | None = None) -> str:
    """The HF model_type of ``model``: ``base``'s (the original config.json), else the one its
    fields describe (Gemma-2, Qwen2, Qwen3, Qwen3-MoE, Mixtral, Mistral or Llama); raises
    unless the fields fit it."""
    model_type = (base or {}).get("model_type") or (
        "gemma2"
        if model.sandwich_norm
        else "qwen2"
        if model.add_qkv_bias
        else ("qwen3_moe" if model.num_experts else "qwen3")
        if model.qk_layernorm
        else "mixtral"
        if model.num_experts
        else "mistral"
        if model.sliding_window
        else "llama"
    )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(f"base config.json: model_type {model_type!r} is not supported")
    gemma = model_type == "gemma2"
    expected = dict(
        swiglu=not gemma,
        geglu=gemma,
        apply_layernorm_1p=gemma,
        sandwich_norm=gemma,
        scale_embeddings=gemma,
        add_qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type in _QK_NORM,
        normalization="RMSNorm",
        rotary_percent=1.0,
    )
    if (model.num_experts is not None) != (model_type in MOE_MODEL_TYPES):
        raise HFConversionError(f"num_experts={model.num_experts} does not fit model_type {model_type!r}")
    if model_type == "mixtral" and model.moe_router_pre_softmax:
        raise HFConversionError("moe_router_pre_softmax=True does not fit model_type 'mixtral' (it renormalizes)")
    for name, value in expected.items():
        if getattr(model, name) != value:
            raise HFConversionError(
                f"{name}={getattr(model, name)!r} does not fit model_type {model_type!r} (needs {value!r})"
            )
    if not gemma:
        for name in ("softmax_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(model, name) is not None:
                raise HFConversionError(f"{name}={getattr(model, name)} has no {model_type} equivalent")
    if model.window_attn_skip_freq is not None and (model.window_attn_skip_freq != 2 or not gemma):
        raise HFConversionError(
            f"window_attn_skip_freq={model.window_attn_skip_freq} does not fit model_type {model_type!r} "
            "(Gemma-2 alternates windowed and full layers: 2)"
        )
    return model_type


def to_hf_config(
    cfg: SimPOConfig, base: Mapping[str, Any] | None = None, dtype_name: str = "float32"
) -> dict[str, Any]:
    """The HF config.json of the model ``cfg`` describes, with weights of ``dtype_name``.

    ``base`` (the original config.json) keeps its other entries (token ids, model_type);
    without it the model type follows from the fields (``hf_model_type``). An unset
    --max-position-embeddings is ``base``'s, else --seq-length.
    """
    model = cfg.model
    model_type = hf_model_type(model, base)
    out = dict(base or {})
    for key, value in (
        ("vocab_size", model.vocab_size),
        ("hidden_size", model.hidden_size),
        ("num_hidden_layers", model.num_layers),
    ):
        if out.get(key) not in (None, value):
            raise HFConversionError(
                f"base config.json: {key}={out[key]}, the checkpoint has {value}: it describes another model"
            )
    heads = model.num_attention_heads
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        hidden_size=model.hidden_size,
        intermediate_size=model.derived_ffn_hidden_size(),
        num_hidden_layers=model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.kv_channels or model.hidden_size // heads,
        vocab_size=model.vocab_size,
        max_position_embeddings=(
            model.max_position_embeddings or out.get("max_position_embeddings") or cfg.data.seq_length
        ),
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
    )
    if model_type == "gemma2":
        scalar = (model.softmax_scale or (out["head_dim"] ** -0.5)) ** -2
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
            attn_logit_softcapping=model.attn_logit_softcapping,
            final_logit_softcapping=model.final_logit_softcapping,
        )
    else:
        out["hidden_act"] = "silu"
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type in _QK_NORM:
        out["attention_bias"] = False
    if model_type in MOE_MODEL_TYPES:
        expert_size = model.moe_ffn_hidden_size or model.derived_ffn_hidden_size()
        out.update(num_experts_per_tok=model.moe_router_topk)
        if model_type == "mixtral":
            out.update(num_local_experts=model.num_experts, intermediate_size=expert_size)
        else:
            out["num_local_experts" if "num_local_experts" in out else "num_experts"] = model.num_experts
            out.update(
                moe_intermediate_size=expert_size,
                norm_topk_prob=not model.moe_router_pre_softmax,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        if model.moe_aux_loss_coeff:
            out.update(output_router_logits=True, router_aux_loss_coef=model.moe_aux_loss_coeff)
    if model_type in ("mistral", "gemma2") or model.sliding_window is not None:
        out["sliding_window"] = model.sliding_window
        if "layer_types" in out or model.window_attn_skip_freq:
            out["layer_types"] = [
                "sliding_attention"
                if model.sliding_window and (not model.window_attn_skip_freq or i % 2 == 0)
                else "full_attention"
                for i in range(model.num_layers)
            ]
    scaling = None
    if model.use_rope_scaling:
        scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **_LLAMA3_FIXED}
    if "rope_parameters" in out:  # transformers 5 style
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(model.rotary_base)}
    else:  # transformers 4 style, which 5 reads too
        out.update(rope_theta=float(model.rotary_base), rope_scaling=scaling)
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype_name
    return out


# ----------------------------------------------------------------------------- the checkpoint's record


def model_config_dict(model: ModelConfig) -> dict[str, Any]:
    """The shape of ``model`` (its architecture fields), to store in a checkpoint."""
    return {name: getattr(model, name) for name in MODEL_FIELDS}


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig a checkpoint records (``values``: its stored config, flat); other fields default."""
    required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise HFConversionError(f"stored model config lacks {', '.join(missing)}")
    return ModelConfig(**{name: values[name] for name in MODEL_FIELDS if name in values})
