"""Hugging Face <-> megatron-core mapping for Llama, Mistral and Qwen2 (pure functions).

Config: an HF ``config.json`` (a dict) maps to the model fields of ``SimPOConfig`` and back.
Tensors: HF names and layout map to the state_dict of the GPTModel that ``build_model``
makes at TP=1/PP=1 with the local layer spec, and back:

    model.embed_tokens.weight            embedding.word_embeddings.weight (vocab padded with zero rows)
    model.layers.N.input_layernorm       decoder.layers.N.input_layernorm.weight
    model.layers.N.self_attn.{q,k,v}     decoder.layers.N.self_attention.linear_qkv.{weight,bias}
                                         (per query group g: [q heads of g; k_g; v_g])
    model.layers.N.self_attn.o_proj      decoder.layers.N.self_attention.linear_proj.weight
    model.layers.N.post_attention_ln     decoder.layers.N.pre_mlp_layernorm.weight
    model.layers.N.mlp.{gate,up}_proj    decoder.layers.N.mlp.linear_fc1.weight = [gate; up]
    model.layers.N.mlp.down_proj         decoder.layers.N.mlp.linear_fc2.weight
    model.norm.weight                    decoder.final_layernorm.weight
    lm_head.weight                       output_layer.weight (untied models only)

Both use rotate-half RoPE, so q/k rows need no permutation. Anything that does not fit
raises ``HFConversionError`` naming the config field or the tensor.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from simpo_megatron.config import SimPOConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# SimPOConfig fields that describe the model's shape (what a checkpoint must record).
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "max_position_embeddings", "normalization", "norm_epsilon",
    "swiglu", "rotary_base", "rotary_percent", "use_rope_scaling", "rope_scaling_factor",
    "untie_embeddings_and_output_weights", "add_qkv_bias",
)

# megatron-core 0.16.1 fixes these Llama-3 RoPE scaling parameters (RotaryEmbedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Files besides the weights that make an HF model directory usable; copied through conversions.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def sliding_window(hf_config: Mapping[str, Any]) -> int | None:
    """The attention window the HF model uses, or None for full causal attention."""
    if hf_config.get("model_type") == "qwen2":
        layer_types = hf_config.get("layer_types")
        if layer_types is not None:
            used = "sliding_attention" in layer_types
        else:  # transformers 4: layers from max_window_layers on use the window
            used = bool(hf_config.get("use_sliding_window")) and (
                hf_config.get("max_window_layers", 0) < hf_config.get("num_hidden_layers", 0)
            )
        return hf_config.get("sliding_window") if used else None
    return hf_config.get("sliding_window")


def hf_config_to_overrides(hf_config: Mapping[str, Any], seq_length: int | None = None) -> dict[str, Any]:
    """The SimPOConfig model fields of an HF config.json.

    The model attends to all previous tokens: an HF sliding window (Mistral, some Qwen2) is
    exact only for sequences that fit in it, so ``seq_length`` longer than the window raises.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(
            f"config.json: model_type {model_type!r} (architectures {hf_config.get('architectures')}) "
            f"is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf_config.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"config.json: hidden_act {hf_config['hidden_act']!r} is not supported (silu only)")
    if hf_config.get("mlp_bias"):
        raise HFConversionError("config.json: mlp_bias=true is not supported")
    if model_type != "qwen2" and hf_config.get("attention_bias"):
        raise HFConversionError(
            "config.json: attention_bias=true is not supported: it adds a bias to the output "
            "projection too, which megatron's add_qkv_bias does not cover"
        )
    window = sliding_window(hf_config)
    if window is not None and seq_length is not None and window < seq_length:
        raise HFConversionError(
            f"config.json: sliding_window={window} is smaller than --seq-length {seq_length}; the "
            "converted model uses full causal attention, exact only up to the window"
        )
    heads = _require(hf_config, "num_attention_heads")
    hidden = _require(hf_config, "hidden_size")
    theta, scaling = _rope(hf_config)
    if float(theta) != int(theta):
        raise HFConversionError(f"config.json: rope_theta {theta} is not an integer (--rotary-base is)")
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
        swiglu=True,
        rotary_base=int(theta),
        rotary_percent=1.0,
        use_rope_scaling=scaling is not None,
        rope_scaling_factor=scaling if scaling is not None else 8.0,
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
        add_qkv_bias=model_type == "qwen2",
    )


def hf_model_overrides(hf_dir: str, seq_length: int | None = None) -> dict[str, Any]:
    """The SimPOConfig model fields of the HF model in ``hf_dir`` (see hf_config_to_overrides)."""
    return hf_config_to_overrides(read_hf_config(hf_dir), seq_length)


def model_config(values: Mapping[str, Any]) -> SimPOConfig:
    """A TP=1/PP=1 SimPOConfig with the model fields of ``values`` (a stored config dict)."""
    required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise HFConversionError(f"stored model config lacks {', '.join(missing)}")
    return SimPOConfig.from_flat({name: values[name] for name in MODEL_FIELDS if name in values})


def model_config_dict(cfg: SimPOConfig) -> dict[str, Any]:
    """The model fields of ``cfg``, to store in a checkpoint."""
    return {name: getattr(cfg, name) for name in MODEL_FIELDS}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in _DTYPES.items() if d == dtype)


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise HFConversionError(f"dtype {name!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def hf_config_dtype(hf_config: Mapping[str, Any]) -> torch.dtype | None:
    """The weights' dtype an HF config declares (``dtype`` or ``torch_dtype``), if any."""
    name = hf_config.get("dtype", hf_config.get("torch_dtype"))
    return _DTYPES.get(name) if isinstance(name, str) else None


def overrides_to_hf_config(
    cfg: SimPOConfig, base: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """An HF config.json for the model ``cfg`` describes.

    ``base`` (the original config.json) keeps its other entries (token ids, model_type);
    without it the model is a Llama, or a Qwen2 when it has a QKV bias.
    """
    for name, supported in (("normalization", "RMSNorm"), ("swiglu", True), ("rotary_percent", 1.0)):
        if getattr(cfg, name) != supported:
            raise HFConversionError(f"{name}={getattr(cfg, name)!r} has no HF equivalent (needs {supported!r})")
    out = dict(base or {})
    model_type = out.get("model_type") or ("qwen2" if cfg.add_qkv_bias else "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(f"base config.json: model_type {model_type!r} is not supported")
    if cfg.add_qkv_bias != (model_type == "qwen2"):
        raise HFConversionError(
            f"add_qkv_bias={cfg.add_qkv_bias} does not fit model_type {model_type!r} "
            "(only Qwen2 has a QKV bias)"
        )
    for key, value in (("vocab_size", cfg.vocab_size), ("hidden_size", cfg.hidden_size),
                       ("num_hidden_layers", cfg.num_layers)):
        if out.get(key) not in (None, value):
            raise HFConversionError(
                f"base config.json: {key}={out[key]}, the checkpoint has {value}: it describes another model"
            )
    heads = cfg.num_attention_heads
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.model.derived_ffn_hidden_size(),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings or out.get("max_position_embeddings") or cfg.seq_length,
        rms_norm_eps=cfg.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    scaling = (
        {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **_LLAMA3_FIXED} if cfg.use_rope_scaling else None
    )
    if "rope_parameters" in out:  # transformers 5 style
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(cfg.rotary_base)}
    else:  # transformers 4 style, which 5 reads too
        out.update(rope_theta=float(cfg.rotary_base), rope_scaling=scaling)
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype_name(dtype)
    return out


# ----------------------------------------------------------------------------- tensors


def _dims(cfg: SimPOConfig) -> tuple[int, int, int, int, int]:
    heads = cfg.num_attention_heads
    return cfg.hidden_size, cfg.model.derived_ffn_hidden_size(), heads, cfg.num_query_groups or heads, (
        cfg.kv_channels or cfg.hidden_size // heads
    )


def hf_tensor_shapes(cfg: SimPOConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF model of ``cfg`` has, with its shape."""
    h, f, heads, groups, d = _dims(cfg)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if cfg.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (groups * d, h),
            p + "self_attn.v_proj.weight": (groups * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if cfg.add_qkv_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (heads * d,),
                p + "self_attn.k_proj.bias": (groups * d,),
                p + "self_attn.v_proj.bias": (groups * d,),
            })
    return shapes


def _check_hf_tensors(hf: Mapping[str, torch.Tensor], cfg: SimPOConfig) -> None:
    expected = hf_tensor_shapes(cfg)
    ignored = {n for n in hf if n.endswith("rotary_emb.inv_freq")}
    if not cfg.untie_embeddings_and_output_weights:
        ignored.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected) - ignored)
    if missing:
        raise HFConversionError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise HFConversionError(
            f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if tuple(hf[name].shape) != shape:
            raise HFConversionError(
                f"tensor {name}: shape {tuple(hf[name].shape)}, expected {shape} from config.json"
            )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], cfg: SimPOConfig, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """Megatron TP=1/PP=1 state_dict entries from HF tensors (shapes checked against ``cfg``)."""
    _check_hf_tensors(hf, cfg)
    _, _, heads, groups, d = _dims(cfg)
    per_group = heads // groups

    def qkv(prefix: str, kind: str) -> torch.Tensor:
        q, k, v = (hf[f"{prefix}self_attn.{x}_proj.{kind}"] for x in "qkv")
        tail = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
            dim=1,
        ).reshape(-1, *tail)

    out = {
        "embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], padded_vocab_size),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab_size)
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = qkv(p, "weight")
        if cfg.add_qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = qkv(p, "bias")
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(
    state: Mapping[str, torch.Tensor], cfg: SimPOConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors from a TP=1/PP=1 state_dict: vocabulary padding removed, each a fresh
    contiguous copy (in ``dtype`` if given)."""
    _, f, heads, groups, d = _dims(cfg)
    per_group = heads // groups

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise HFConversionError(f"checkpoint lacks tensor {name}")
        return state[name]

    def split_qkv(t: torch.Tensor) -> list[torch.Tensor]:
        tail = t.shape[1:]
        parts = t.reshape(groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
        return [p.reshape(-1, *tail) for p in parts]

    vocab = cfg.vocab_size
    out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:vocab]}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = get(m + "input_layernorm.weight")
        kinds = ("weight", "bias") if cfg.add_qkv_bias else ("weight",)
        for kind in kinds:
            for x, t in zip("qkv", split_qkv(get(f"{m}self_attention.linear_qkv.{kind}"))):
                out[f"{p}self_attn.{x}_proj.{kind}"] = t
        out[p + "self_attn.o_proj.weight"] = get(m + "self_attention.linear_proj.weight")
        out[p + "post_attention_layernorm.weight"] = get(m + "pre_mlp_layernorm.weight")
        gate, up = get(m + "mlp.linear_fc1.weight").split([f, f])
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = get(m + "mlp.linear_fc2.weight")
    out["model.norm.weight"] = get("decoder.final_layernorm.weight")
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = get("output_layer.weight")[:vocab]
    return {name: t.detach().to(dtype or t.dtype, copy=True).contiguous() for name, t in out.items()}


# ----------------------------------------------------------------------------- files


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFConversionError(f"{hf_dir}: no config.json")
    with open(path) as fh:
        return json.load(fh)


def safetensors_files(hf_dir: str) -> list[str]:
    """The weight files of an HF directory: those its index names, or every *.safetensors."""
    index = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(hf_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` is an HF model directory (config.json and safetensors weights)."""
    return os.path.isfile(os.path.join(path, "config.json")) and bool(safetensors_files(path))


def load_safetensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, sharded (with an index) or not."""
    files = safetensors_files(hf_dir)
    if not files:
        raise HFConversionError(f"{hf_dir}: no *.safetensors weights (convert .bin weights to safetensors first)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not os.path.isfile(path):
            raise HFConversionError(f"{SAFETENSORS_INDEX} names {os.path.basename(path)}, which is missing")
        shard = load_file(path)
        twice = sorted(set(shard) & set(tensors))
        if twice:
            raise HFConversionError(f"tensor {twice[0]} is stored in more than one file")
        tensors.update(shard)
    return tensors


def parse_size(size: str | int) -> int:
    """Bytes from 12345, '500MB', '5GB' or '100KB' (decimal units, as Hugging Face uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, scale in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def save_safetensors(tensors: Mapping[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Write ``model.safetensors``, or shards with an index above ``max_shard_bytes``; returns the files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {t: name for name, shard in zip(names, shards) for t in shard},
        }
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as fh:
            json.dump(index, fh, indent=2)
    return names
