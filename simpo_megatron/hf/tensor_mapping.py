"""Hugging Face tensors <-> megatron-core checkpoint tensors, for Llama, Mistral, Qwen2, Qwen3,
Gemma-2, Qwen3-MoE and Mixtral.

Pure functions of tensors and the model section of a config; no model, no process group.
The Megatron side is megatron-core's *global* (unsharded) checkpoint layout: the keys and
shapes of ``model.sharded_state_dict()`` as a dist checkpoint stores them, whatever the TP/PP
layout that wrote or reads it:

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
    model.layers.N.self_attn.{q,k}_norm    decoder.layers.self_attention.{q,k}_layernorm.weight (Qwen3)
    model.layers.N.mlp.gate (Qwen3-MoE) /  decoder.layers.mlp.router.weight  [L, E, h]
      block_sparse_moe.gate (Mixtral)
    ...experts.E.{gate,up}_proj / w1, w3   decoder.layers.mlp.experts.experts.linear_fc1.weight  [L, E, 2f, h]
    ...experts.E.down_proj / w2            decoder.layers.mlp.experts.experts.linear_fc2.weight  [L, E, h, f]
    model.norm.weight                      decoder.final_layernorm.weight
    lm_head.weight                         output_layer.weight (untied models only)

Layers are stacked on a leading axis (megatron's layer-wise checkpoint keys), experts on a
second one, global expert index (megatron-core's SequentialMLP; expert parallelism slices it). All use
rotate-half RoPE, so q/k rows need no permutation; Gemma's (1 + weight) norms keep their
weights as stored (``apply_layernorm_1p``). Anything that does not fit raises
``HFConversionError`` naming the tensor. The config.json side is ``config_mapping``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from simpo_megatron.config import ModelConfig
from simpo_megatron.hf.errors import HFConversionError

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
Q_NORM = _L + "self_attention.q_layernorm.weight"
K_NORM = _L + "self_attention.k_layernorm.weight"
ROUTER = _L + "mlp.router.weight"
EXPERT_FC1 = _L + "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = _L + "mlp.experts.experts.linear_fc2.weight"


def _moe_names(model: ModelConfig) -> tuple[str, str, str, str] | None:
    """(router, experts prefix, gate and up, down) HF names of a MoE layer, or None if dense.
    Qwen3-MoE: ``mlp.gate``, ``mlp.experts.E.{gate,up,down}_proj``; Mixtral (no QK norm):
    ``block_sparse_moe.gate``, ``block_sparse_moe.experts.E.{w1,w3,w2}``."""
    if model.num_experts is None:
        return None
    if model.qk_layernorm:
        return "mlp.gate.weight", "mlp.experts.", ("gate_proj.weight", "up_proj.weight"), "down_proj.weight"
    return "block_sparse_moe.gate.weight", "block_sparse_moe.experts.", ("w1.weight", "w3.weight"), "w2.weight"


def _dims(model: ModelConfig) -> tuple[int, int, int, int, int]:
    heads = model.num_attention_heads
    return (
        model.hidden_size,
        model.derived_ffn_hidden_size(),
        heads,
        model.num_query_groups or heads,
        (model.kv_channels or model.hidden_size // heads),
    )


def _layer_tensors(model: ModelConfig) -> dict[str, str]:
    """HF per-layer tensor suffix -> Megatron stacked key (QKV and gate/up fused separately)."""
    names = {"input_layernorm.weight": INPUT_NORM, "self_attn.o_proj.weight": PROJ}
    moe = _moe_names(model)
    if moe is None:
        names["mlp.down_proj.weight"] = FC2
    else:
        names[moe[0]] = ROUTER
    if model.qk_layernorm:
        names.update({"self_attn.q_norm.weight": Q_NORM, "self_attn.k_norm.weight": K_NORM})
    if model.sandwich_norm:
        names.update(
            {
                "post_attention_layernorm.weight": POST_ATTN_NORM,
                "pre_feedforward_layernorm.weight": MLP_NORM,
                "post_feedforward_layernorm.weight": POST_MLP_NORM,
            }
        )
    else:
        names["post_attention_layernorm.weight"] = MLP_NORM
    return names


def hf_tensor_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF model of ``model``'s shape has, with its shape."""
    h, f, heads, groups, d = _dims(model)
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h), "model.norm.weight": (h,)}
    if model.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h),
        "self_attn.k_proj.weight": (groups * d, h),
        "self_attn.v_proj.weight": (groups * d, h),
        "self_attn.o_proj.weight": (h, heads * d),
    }
    moe = _moe_names(model)
    if moe is None:
        per_layer.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
    else:
        router, experts, (gate, up), down = moe
        ef = model.moe_ffn_hidden_size or f
        per_layer[router] = (model.num_experts, h)
        for e in range(model.num_experts):
            per_layer.update(
                {f"{experts}{e}.{gate}": (ef, h), f"{experts}{e}.{up}": (ef, h), f"{experts}{e}.{down}": (h, ef)}
            )
    if model.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    if model.sandwich_norm:
        per_layer.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
    if model.add_qkv_bias:
        per_layer.update(
            {
                "self_attn.q_proj.bias": (heads * d,),
                "self_attn.k_proj.bias": (groups * d,),
                "self_attn.v_proj.bias": (groups * d,),
            }
        )
    for i in range(model.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_hf_tensors(shapes: Mapping[str, tuple[int, ...]], model: ModelConfig) -> None:
    """Raise HFConversionError unless ``shapes`` (HF tensor name -> shape) are those of ``model``."""
    expected = hf_tensor_shapes(model)
    ignored = {n for n in shapes if n.endswith("rotary_emb.inv_freq")}
    if not model.untie_embeddings_and_output_weights:
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
            raise HFConversionError(f"tensor {name}: shape {tuple(shapes[name])}, expected {shape} from config.json")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def hf_layer_to_megatron(hf: Mapping[str, torch.Tensor], model: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s Megatron tensors (stacked keys, without the layer axis) from HF tensors.

    ``hf`` may read lazily: only this layer's tensors are accessed.
    """
    _, _, heads, groups, d = _dims(model)
    per_group = heads // groups
    p = f"model.layers.{layer}."

    def qkv(kind: str) -> torch.Tensor:
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        tail = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
            dim=1,
        ).reshape(-1, *tail)

    out = {QKV + "weight": qkv("weight"), **{key: hf[p + suffix] for suffix, key in _layer_tensors(model).items()}}
    moe = _moe_names(model)
    if moe is None:
        out[FC1] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    else:
        _, experts, (gate, up), down = moe
        ids = range(model.num_experts)
        out[EXPERT_FC1] = torch.stack(
            [torch.cat([hf[f"{p}{experts}{e}.{gate}"], hf[f"{p}{experts}{e}.{up}"]]) for e in ids]
        )
        out[EXPERT_FC2] = torch.stack([hf[f"{p}{experts}{e}.{down}"] for e in ids])
    if model.add_qkv_bias:
        out[QKV + "bias"] = qkv("bias")
    return out


_GLOBAL_HF = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight", OUTPUT: "lm_head.weight"}


def hf_global_to_megatron(
    hf: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab_size: int, keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The Megatron tensors outside the layers (embedding, final norm, output layer of an
    untied model), or those of them in ``keys``; vocabulary rows padded with zeros."""
    if keys is None:
        keys = [EMBEDDING, FINAL_NORM] + ([OUTPUT] if model.untie_embeddings_and_output_weights else [])
    out = {}
    for key in keys:
        if key not in _GLOBAL_HF or (key == OUTPUT and not model.untie_embeddings_and_output_weights):
            raise KeyError(key)
        t = hf[_GLOBAL_HF[key]]
        out[key] = t if key == FINAL_NORM else _pad_rows(t, padded_vocab_size)
    return out


def is_layer_key(key: str) -> bool:
    """Whether a Megatron checkpoint key holds all layers stacked on a leading axis."""
    return key.startswith(_L)


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """Megatron global checkpoint tensors from HF tensors (shapes checked against ``model``)."""
    check_hf_tensors({name: tuple(t.shape) for name, t in hf.items()}, model)
    layers = [hf_layer_to_megatron(hf, model, i) for i in range(model.num_layers)]
    stacked = {key: torch.stack([layer[key] for layer in layers]) for key in layers[0]}
    return {**hf_global_to_megatron(hf, model, padded_vocab_size), **stacked}


def megatron_to_hf(
    state: Mapping[str, torch.Tensor], model: ModelConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors from Megatron global checkpoint tensors: vocabulary padding removed, each a
    fresh contiguous copy (in ``dtype`` if given)."""
    _, f, heads, groups, d = _dims(model)
    per_group = heads // groups

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise HFConversionError(f"checkpoint lacks tensor {name}")
        if is_layer_key(name) and state[name].shape[0] != model.num_layers:
            raise HFConversionError(
                f"checkpoint tensor {name}: {state[name].shape[0]} layers, the stored config {model.num_layers}"
            )
        return state[name]

    vocab = model.vocab_size
    out = {"model.embed_tokens.weight": get(EMBEDDING)[:vocab]}
    qkv = {kind: get(QKV + kind) for kind in (("weight", "bias") if model.add_qkv_bias else ("weight",))}
    moe = _moe_names(model)
    if moe is None:
        fc1 = get(FC1)
    else:
        _, experts, (gate, up), down = moe
        ef = model.moe_ffn_hidden_size or f
        expert_fc1, expert_fc2 = get(EXPERT_FC1), get(EXPERT_FC2)
    layer_keys = {suffix: get(key) for suffix, key in _layer_tensors(model).items()}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        for kind, t in qkv.items():
            tail = t.shape[2:]
            parts = t[i].reshape(groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
            for x, part in zip("qkv", parts):
                out[f"{p}self_attn.{x}_proj.{kind}"] = part.reshape(-1, *tail)
        if moe is None:
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = fc1[i].split([f, f])
        else:
            for e in range(model.num_experts):
                out[f"{p}{experts}{e}.{gate}"], out[f"{p}{experts}{e}.{up}"] = expert_fc1[i, e].split([ef, ef])
                out[f"{p}{experts}{e}.{down}"] = expert_fc2[i, e]
        for suffix, t in layer_keys.items():
            out[p + suffix] = t[i]
    out["model.norm.weight"] = get(FINAL_NORM)
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = get(OUTPUT)[:vocab]
    return {name: t.detach().to(dtype or t.dtype, copy=True).contiguous() for name, t in out.items()}
