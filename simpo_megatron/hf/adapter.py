"""Hugging Face <-> megatron-core state-dict adapter for Llama, Mistral, Qwen2 and Gemma-2.

Pure functions, no model and no process group. The Megatron side is megatron-core's
*global* (unsharded) checkpoint layout: the keys and shapes of ``model.sharded_state_dict()``
as a dist checkpoint stores them, whatever the TP/PP layout that wrote or reads it:

    model.embed_tokens.weight              embedding.word_embeddings.weight  [V_pad, h], zero rows pad V
    model.layers.N.input_layernorm         decoder.layers.self_attention.linear_qkv.layer_norm_weight  [L, h]
    model.layers.N.self_attn.{q,k,v}       decoder.layers.self_attention.linear_qkv.{weight,bias}
                                           [L, ...]: per query group g, [q heads of g; k_g; v_g]
    model.layers.N.self_attn.o_proj        decoder.layers.self_attention.linear_proj.weight
    model.layers.N.post_attention_ln       decoder.layers.mlp.linear_fc1.layer_norm_weight
      (Gemma-2: post_attention_layernorm   decoder.layers.self_attention.linear_proj.post_layernorm.weight,
       pre_feedforward_layernorm           decoder.layers.mlp.linear_fc1.layer_norm_weight,
       post_feedforward_layernorm          decoder.layers.mlp.linear_fc2.post_layernorm.weight)
    model.layers.N.mlp.{gate,up}_proj      decoder.layers.mlp.linear_fc1.weight = [gate; up] on dim 1
    model.layers.N.mlp.down_proj           decoder.layers.mlp.linear_fc2.weight
    model.norm.weight                      decoder.final_layernorm.weight
    lm_head.weight                         output_layer.weight (untied models only)

Layers are stacked on a leading axis (megatron's layer-wise checkpoint keys). All use
rotate-half RoPE, so q/k rows need no permutation; Gemma's (1 + weight) norms keep their
weights as stored (``apply_layernorm_1p``). Anything that does not fit raises
``HFConversionError`` naming the config field or the tensor.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from simpo_megatron.config import ModelConfig, SimPOConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_TIED_BY_DEFAULT = {"gemma2"}  # transformers' default tie_word_embeddings per model type

# The model fields that describe its shape (what a checkpoint must record).
MODEL_FIELDS = ModelConfig.architecture_fields()

# megatron-core 0.16.1 fixes these Llama-3 RoPE scaling parameters (RotaryEmbedding._apply_scaling
# takes only the factor from GPTModel); Llama-3.1 (factor 8) and 3.2 (factor 32) use exactly these.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Megatron global checkpoint keys.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_L = "decoder.layers."
INPUT_NORM = _L + "self_attention.linear_qkv.layer_norm_weight"
QKV = _L + "self_attention.linear_qkv."  # + weight / bias
PROJ = _L + "self_attention.linear_proj.weight"
POST_ATTN_NORM = _L + "self_attention.linear_proj.post_layernorm.weight"
MLP_NORM = _L + "mlp.linear_fc1.layer_norm_weight"
FC1 = _L + "mlp.linear_fc1.weight"
FC2 = _L + "mlp.linear_fc2.weight"
POST_MLP_NORM = _L + "mlp.linear_fc2.post_layernorm.weight"


class HFConversionError(ValueError):
    """A model, config field or tensor that cannot be converted; the message names it."""


# ----------------------------------------------------------------------------- config


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise HFConversionError(f"config.json: missing field {key!r}")
    return hf_config[key]


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
    if model_type == "qwen2":  # transformers 4: layers from max_window_layers on use the window
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
        geglu=gemma,
        apply_layernorm_1p=gemma,
        sandwich_norm=gemma,
        scale_embeddings=gemma,
        softmax_scale=float(scalar) ** -0.5 if scalar is not None else None,
        attn_logit_softcapping=hf_config.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=hf_config.get("final_logit_softcapping") if gemma else None,
        **_window_fields(hf_config, seq_length),
    )


def model_config(values: Mapping[str, Any]) -> SimPOConfig:
    """A TP=1/PP=1 SimPOConfig with the model fields of ``values`` (a stored config dict)."""
    required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise HFConversionError(f"stored model config lacks {', '.join(missing)}")
    return SimPOConfig.from_flat({name: values[name] for name in MODEL_FIELDS if name in values})


def model_config_dict(cfg: SimPOConfig) -> dict[str, Any]:
    """The model fields of ``cfg``, to store in a checkpoint."""
    return {name: getattr(cfg.model, name) for name in MODEL_FIELDS}


def _model_type(cfg: SimPOConfig, base: Mapping[str, Any] | None) -> str:
    model_type = (base or {}).get("model_type") or (
        "gemma2" if cfg.model.sandwich_norm else "qwen2" if cfg.model.add_qkv_bias else "mistral" if cfg.model.sliding_window else "llama"
    )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(f"base config.json: model_type {model_type!r} is not supported")
    gemma = model_type == "gemma2"
    expected = dict(
        swiglu=not gemma, geglu=gemma, apply_layernorm_1p=gemma, sandwich_norm=gemma, scale_embeddings=gemma,
        add_qkv_bias=model_type == "qwen2", normalization="RMSNorm", rotary_percent=1.0,
    )
    for name, value in expected.items():
        if getattr(cfg.model, name) != value:
            raise HFConversionError(
                f"{name}={getattr(cfg.model, name)!r} does not fit model_type {model_type!r} (needs {value!r})"
            )
    if not gemma:
        for name in ("softmax_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg.model, name) is not None:
                raise HFConversionError(f"{name}={getattr(cfg.model, name)} has no {model_type} equivalent")
    if cfg.model.window_attn_skip_freq is not None and (cfg.model.window_attn_skip_freq != 2 or not gemma):
        raise HFConversionError(
            f"window_attn_skip_freq={cfg.model.window_attn_skip_freq} does not fit model_type {model_type!r} "
            "(Gemma-2 alternates windowed and full layers: 2)"
        )
    return model_type


def overrides_to_hf_config(
    cfg: SimPOConfig, base: Mapping[str, Any] | None = None, dtype_name: str = "float32"
) -> dict[str, Any]:
    """An HF config.json for the model ``cfg`` describes.

    ``base`` (the original config.json) keeps its other entries (token ids, model_type);
    without it the model type follows from the fields (Gemma-2, Qwen2, Mistral or Llama).
    """
    model_type = _model_type(cfg, base)
    out = dict(base or {})
    for key, value in (("vocab_size", cfg.model.vocab_size), ("hidden_size", cfg.model.hidden_size),
                       ("num_hidden_layers", cfg.model.num_layers)):
        if out.get(key) not in (None, value):
            raise HFConversionError(
                f"base config.json: {key}={out[key]}, the checkpoint has {value}: it describes another model"
            )
    heads = cfg.model.num_attention_heads
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.derived_ffn_hidden_size(),
        num_hidden_layers=cfg.model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.model.num_query_groups or heads,
        head_dim=cfg.model.kv_channels or cfg.model.hidden_size // heads,
        vocab_size=cfg.model.vocab_size,
        max_position_embeddings=cfg.model.max_position_embeddings or out.get("max_position_embeddings") or cfg.data.seq_length,
        rms_norm_eps=cfg.model.norm_epsilon,
        tie_word_embeddings=not cfg.model.untie_embeddings_and_output_weights,
    )
    if model_type == "gemma2":
        scalar = (cfg.model.softmax_scale or (out["head_dim"] ** -0.5)) ** -2
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
            attn_logit_softcapping=cfg.model.attn_logit_softcapping,
            final_logit_softcapping=cfg.model.final_logit_softcapping,
        )
    else:
        out["hidden_act"] = "silu"
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type in ("mistral", "gemma2") or cfg.model.sliding_window is not None:
        out["sliding_window"] = cfg.model.sliding_window
        if "layer_types" in out or cfg.model.window_attn_skip_freq:
            out["layer_types"] = [
                "sliding_attention" if cfg.model.sliding_window and (not cfg.model.window_attn_skip_freq or i % 2 == 0)
                else "full_attention" for i in range(cfg.model.num_layers)
            ]
    scaling = (
        {"rope_type": "llama3", "factor": cfg.model.rope_scaling_factor, **_LLAMA3_FIXED} if cfg.model.use_rope_scaling else None
    )
    if "rope_parameters" in out:  # transformers 5 style
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(cfg.model.rotary_base)}
    else:  # transformers 4 style, which 5 reads too
        out.update(rope_theta=float(cfg.model.rotary_base), rope_scaling=scaling)
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype_name
    return out


# ----------------------------------------------------------------------------- tensors


def _dims(cfg: SimPOConfig) -> tuple[int, int, int, int, int]:
    heads = cfg.model.num_attention_heads
    return cfg.model.hidden_size, cfg.model.derived_ffn_hidden_size(), heads, cfg.model.num_query_groups or heads, (
        cfg.model.kv_channels or cfg.model.hidden_size // heads
    )


def _layer_tensors(cfg: SimPOConfig) -> dict[str, str]:
    """HF per-layer tensor suffix -> Megatron stacked key (QKV and gate/up fused separately)."""
    names = {
        "input_layernorm.weight": INPUT_NORM,
        "self_attn.o_proj.weight": PROJ,
        "mlp.down_proj.weight": FC2,
    }
    if cfg.model.sandwich_norm:
        names.update({
            "post_attention_layernorm.weight": POST_ATTN_NORM,
            "pre_feedforward_layernorm.weight": MLP_NORM,
            "post_feedforward_layernorm.weight": POST_MLP_NORM,
        })
    else:
        names["post_attention_layernorm.weight"] = MLP_NORM
    return names


def hf_tensor_shapes(cfg: SimPOConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF model of ``cfg`` has, with its shape."""
    h, f, heads, groups, d = _dims(cfg)
    shapes = {"model.embed_tokens.weight": (cfg.model.vocab_size, h), "model.norm.weight": (h,)}
    if cfg.model.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.model.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (groups * d, h),
        "self_attn.v_proj.weight": (groups * d, h), "self_attn.o_proj.weight": (h, heads * d),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if cfg.model.sandwich_norm:
        per_layer.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
    if cfg.model.add_qkv_bias:
        per_layer.update({
            "self_attn.q_proj.bias": (heads * d,), "self_attn.k_proj.bias": (groups * d,),
            "self_attn.v_proj.bias": (groups * d,),
        })
    for i in range(cfg.model.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_hf_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: SimPOConfig) -> None:
    """Raise HFConversionError unless ``shapes`` (HF tensor name -> shape) are those of ``cfg``."""
    expected = hf_tensor_shapes(cfg)
    ignored = {n for n in shapes if n.endswith("rotary_emb.inv_freq")}
    if not cfg.model.untie_embeddings_and_output_weights:
        ignored.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - ignored)
    if missing:
        raise HFConversionError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise HFConversionError(
            f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise HFConversionError(
                f"tensor {name}: shape {tuple(shapes[name])}, expected {shape} from config.json"
            )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def hf_layer_to_megatron(hf: Mapping[str, torch.Tensor], cfg: SimPOConfig, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s Megatron tensors (stacked keys, without the layer axis) from HF tensors.

    ``hf`` may read lazily: only this layer's tensors are accessed.
    """
    _, _, heads, groups, d = _dims(cfg)
    per_group = heads // groups
    p = f"model.layers.{layer}."

    def qkv(kind: str) -> torch.Tensor:
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        tail = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
            dim=1,
        ).reshape(-1, *tail)

    out = {
        QKV + "weight": qkv("weight"),
        FC1: torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
        **{key: hf[p + suffix] for suffix, key in _layer_tensors(cfg).items()},
    }
    if cfg.model.add_qkv_bias:
        out[QKV + "bias"] = qkv("bias")
    return out


_GLOBAL_HF = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight", OUTPUT: "lm_head.weight"}


def hf_global_to_megatron(
    hf: Mapping[str, torch.Tensor], cfg: SimPOConfig, padded_vocab_size: int, keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The Megatron tensors outside the layers (embedding, final norm, output layer of an
    untied model), or those of them in ``keys``; vocabulary rows padded with zeros."""
    if keys is None:
        keys = [EMBEDDING, FINAL_NORM] + ([OUTPUT] if cfg.model.untie_embeddings_and_output_weights else [])
    out = {}
    for key in keys:
        if key not in _GLOBAL_HF or (key == OUTPUT and not cfg.model.untie_embeddings_and_output_weights):
            raise KeyError(key)
        t = hf[_GLOBAL_HF[key]]
        out[key] = t if key == FINAL_NORM else _pad_rows(t, padded_vocab_size)
    return out


def is_layer_key(key: str) -> bool:
    """Whether a Megatron checkpoint key holds all layers stacked on a leading axis."""
    return key.startswith(_L)


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], cfg: SimPOConfig, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """Megatron global checkpoint tensors from HF tensors (shapes checked against ``cfg``)."""
    check_hf_tensors({name: tuple(t.shape) for name, t in hf.items()}, cfg)
    layers = [hf_layer_to_megatron(hf, cfg, i) for i in range(cfg.model.num_layers)]
    stacked = {key: torch.stack([layer[key] for layer in layers]) for key in layers[0]}
    return {**hf_global_to_megatron(hf, cfg, padded_vocab_size), **stacked}


def megatron_to_hf(
    state: Mapping[str, torch.Tensor], cfg: SimPOConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors from Megatron global checkpoint tensors: vocabulary padding removed, each a
    fresh contiguous copy (in ``dtype`` if given)."""
    _, f, heads, groups, d = _dims(cfg)
    per_group = heads // groups

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise HFConversionError(f"checkpoint lacks tensor {name}")
        if is_layer_key(name) and state[name].shape[0] != cfg.model.num_layers:
            raise HFConversionError(
                f"checkpoint tensor {name}: {state[name].shape[0]} layers, the stored config {cfg.model.num_layers}"
            )
        return state[name]

    vocab = cfg.model.vocab_size
    out = {"model.embed_tokens.weight": get(EMBEDDING)[:vocab]}
    qkv = {kind: get(QKV + kind) for kind in (("weight", "bias") if cfg.model.add_qkv_bias else ("weight",))}
    fc1 = get(FC1)
    layer_keys = {suffix: get(key) for suffix, key in _layer_tensors(cfg).items()}
    for i in range(cfg.model.num_layers):
        p = f"model.layers.{i}."
        for kind, t in qkv.items():
            tail = t.shape[2:]
            parts = t[i].reshape(groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
            for x, part in zip("qkv", parts):
                out[f"{p}self_attn.{x}_proj.{kind}"] = part.reshape(-1, *tail)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = fc1[i].split([f, f])
        for suffix, t in layer_keys.items():
            out[p + suffix] = t[i]
    out["model.norm.weight"] = get(FINAL_NORM)
    if cfg.model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = get(OUTPUT)[:vocab]
    return {name: t.detach().to(dtype or t.dtype, copy=True).contiguous() for name, t in out.items()}
