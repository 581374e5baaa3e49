"""Qwen3, Qwen3-MoE and Mixtral: import, export, and parity with transformers on TP, PP and EP.

Tiny random models from transformers' own classes (2 layers, hidden 64, 4 experts, top-2):

- qwen3: QK-norm, head_dim 32 != hidden / heads, tied embeddings;
- qwen3_moe: QK-norm, routing by the softmax over all experts, top-k weights not
  renormalized (``norm_topk_prob=false``);
- mixtral: routing weights renormalized over the top 2.

The reference test checks that dropping the QK-norm, changing the routing normalization or
the top-k changes transformers' own logits, so matching them tests each. One world-1 spawn
imports, exports (bit-exact) and checks each model; one world-2 spawn checks each on TP=2,
PP=2 and EP=2 (DP=2), loading straight from the HF directory, and saves the EP=2 model, which
is exported back exactly. The harness (batches, references, the checks) is test_hf_interop's.

A second world-2 spawn trains Mixtral one Adam step (router not frozen) through the training loop
from the HF directory on DP=2 padded, and on the same global batch packed, with the chunked
log-prob head, on CP=2 and on CP=2 packed; each must give DP=2 padded's loss, metrics and
gradients (Adam's first moment after one step is (1 - beta1) x gradient), experts' and
routers' included, as in test_layouts.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

transformers = pytest.importorskip("transformers")

from test_hf_interop import (  # noqa: E402
    _by_value,
    _check,
    _config,
    _last_stage,
    assert_matches,
    assert_same_tensors,
    hf_tensors,
    logits_of,
    make_batches,
    reference,
)

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODELS = ("qwen3", "qwen3_moe", "mixtral")
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}  # name -> (TP, PP, EP)
# One Adam step with the routers frozen. A large eps makes Adam's first update smooth in the
# gradient (about lr x g / eps), not lr x sign(g), which rounding flips where g is near 0.
STEP = dict(freeze_router=True, optimizer="adam", lr=0.05, adam_eps=1.0, weight_decay=0.0)
SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def hf_model(kind: str, **changes):
    """The tiny transformers model of ``kind`` (random weights; ``changes`` edit its config)."""
    if kind == "qwen3":
        config = transformers.Qwen3Config(**SHAPE, intermediate_size=128, head_dim=32, tie_word_embeddings=True)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **SHAPE,
            intermediate_size=128,
            moe_intermediate_size=32,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    else:
        config = transformers.MixtralConfig(**SHAPE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    for key, value in changes.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_hf_model(kind: str, path, **changes) -> str:
    """``hf_model(kind, **changes)`` with its test weights, saved to ``path``."""
    torch.manual_seed(MODELS.index(kind))
    model = hf_model(kind, **changes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms away from 1, router logits of O(1) so that routing is not a near tie
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.5 if name.endswith("gate.weight") else 0.1)
    model.save_pretrained(path)
    return str(path)


def _world1_worker(hf_dirs: dict, out: str, batches) -> dict:
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.hf_checkpoint import export_checkpoint, import_hf_checkpoint

    initialize_distributed(ParallelLayout(1, 1))
    results = {}
    for name, hf_dir in hf_dirs.items():
        ckpt = import_hf_checkpoint(hf_dir, os.path.join(out, name))
        export_checkpoint(ckpt, os.path.join(out, f"{name}_hf"))
        cfg = _config(hf_dir, 1, 1, **STEP) if name == "mixtral" else _config(hf_dir, 1, 1)
        state, results[name] = _check(cfg, ckpt, batches)
        if name == "mixtral":
            results["step_loss"] = _step(cfg, state, batches, os.path.join(out, "mixtral_step"))
    return _by_value(results)


def _step(cfg, state, batches, save: str) -> float | None:
    """One optimizer step on ``batches`` (this rank's), saved under ``save``; its loss."""
    from simpo_megatron.training.checkpointing import config_to_dict, save_checkpoint
    from simpo_megatron.training.trainer import train_step

    step = train_step(cfg, state, batches)
    assert not step["skipped"]
    save_checkpoint(save, state, config_dict=config_to_dict(cfg))
    return None if step["metrics"] is None else step["metrics"]["loss"]


def _layouts_worker(hf_dirs: dict, batches, save: str) -> dict:
    """Every model on every layout of LAYOUTS, one after the other in this world of 2."""
    from megatron.core import parallel_state

    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import config_to_dict, save_checkpoint

    results = {}
    for layout, (tp, pp, ep) in LAYOUTS.items():
        parallel_state.destroy_model_parallel()
        initialize_distributed(ParallelLayout(tp, pp, expert_model_parallel_size=ep))
        for name, hf_dir in hf_dirs.items():
            if ep > 1 and name == "qwen3":
                continue
            cfg = _config(hf_dir, tp, pp, save=os.path.join(save, name), expert_model_parallel_size=ep)
            state, result = _check(cfg, hf_dir, batches)
            results[f"{layout}/{name}"] = result
            if ep > 1:
                save_checkpoint(cfg.checkpoint.save, state, config_dict=config_to_dict(cfg))
        if ep > 1:  # the Mixtral step of the world-1 run, its 2 micro-batches one per DP rank
            cfg = _config(
                hf_dirs["mixtral"], 1, 1, expert_model_parallel_size=2, use_distributed_optimizer=True, **STEP
            )
            state, _ = _check(cfg, hf_dirs["mixtral"], batches)
            rank = parallel_state.get_data_parallel_rank()
            results["step_loss"] = _step(cfg, state, batches[rank : rank + 1], os.path.join(save, "mixtral_step"))
    return _by_value(results)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(kind, root / kind) for kind in MODELS}


@pytest.fixture(scope="module")
def batches():
    return make_batches(0)


@pytest.fixture(scope="module")
def references(hf_dirs, batches) -> dict[str, dict]:
    return {
        name: reference(logits_of(transformers.AutoModelForCausalLM.from_pretrained(d), batches), batches)
        for name, d in hf_dirs.items()
    }


def test_the_test_models_use_every_feature(hf_dirs, references, batches):
    """Without the QK-norm, with the other routing normalization, or with top-1, transformers'
    own logits change on these weights."""
    for name, changes in (
        ("qwen3", dict(rms_norm_eps=1e-5)),  # the norms' weights are replaced by ones below
        ("qwen3_moe", dict(norm_topk_prob=True)),
        ("qwen3_moe", dict(num_experts_per_tok=1)),
        ("mixtral", dict(num_experts_per_tok=1)),
    ):
        model = hf_model(name, **changes)
        weights = hf_tensors(hf_dirs[name])
        if name == "qwen3":  # QK-norm off: unit weights do not make it the identity, so drop the norm
            for layer in model.model.layers:
                layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
            weights = {k: v for k, v in weights.items() if "_norm" not in k or "layernorm" in k}
        model.load_state_dict(weights, strict=False)
        model.tie_weights()
        changed = logits_of(model, batches)
        assert (changed - references[name]["logits"]).abs().max() > 1e-2, (name, changes)


def test_import_export_and_parity_tp1(hf_dirs, references, world1):
    out, results = world1
    for name, ref in references.items():
        assert_matches(results[name], ref, name)
        assert_same_tensors(os.path.join(out, f"{name}_hf"), hf_dirs[name])


def test_parity_on_tp2_pp2_ep2_and_export_from_ep2(hf_dirs, references, world2, tmp_path):
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    save, results = world2
    for layout, (_, _, ep) in LAYOUTS.items():
        for name, ref in references.items():
            if not (ep > 1 and name == "qwen3"):
                assert_matches(results[f"{layout}/{name}"], ref, f"{layout}/{name}")
    for name in ("qwen3_moe", "mixtral"):
        out = str(tmp_path / f"{name}_hf")
        export_checkpoint(str(save / name), out, hf_config_dir=hf_dirs[name])
        assert_same_tensors(out, hf_dirs[name])


def test_step_with_frozen_router_is_the_same_on_ep2_with_the_distributed_optimizer(hf_dirs, world1, world2, tmp_path):
    """One Adam step of Mixtral with --freeze-router: the routers keep their weights, the experts
    move, and EP=2 x DP=2 with the distributed optimizer gives world 1's step."""
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    stepped = {}
    for name, (root, results) in {"world1": world1, "ep2": world2}.items():
        out = str(tmp_path / name)
        export_checkpoint(str(root / "mixtral_step"), out, hf_config_dir=hf_dirs["mixtral"])
        stepped[name] = (hf_tensors(out), results["step_loss"])
    original = hf_tensors(hf_dirs["mixtral"])
    (one, loss1), (two, loss2) = stepped["world1"], stepped["ep2"]
    assert loss1 == pytest.approx(loss2, abs=1e-5)
    for key, value in original.items():
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0, msg=key)
        if key.endswith("gate.weight"):
            assert torch.equal(one[key], value), key
        elif "experts" in key:
            assert (one[key] - value).abs().max() > 1e-4, key  # 100 x the tolerance above


@pytest.fixture(scope="module")
def world1(hf_dirs, batches, tmp_path_factory):
    out = tmp_path_factory.mktemp("world1")
    return out, _last_stage(run_distributed(_world1_worker, 1, hf_dirs, str(out), batches))


@pytest.fixture(scope="module")
def world2(hf_dirs, batches, tmp_path_factory):
    save = tmp_path_factory.mktemp("world2")
    return save, _last_stage(run_distributed(_layouts_worker, 2, hf_dirs, batches, str(save)))


# name -> (CP, config changes); DP = 2 / CP, global batch 4 pairs, micro-batches of 2.
TRAIN_LAYOUTS = {
    "dp2": (1, {}),
    "dp2_packed": (1, {"packing": True}),
    "dp2_chunked_head": (1, {"logprob_chunk_size": 7}),
    "cp2": (2, {}),
    "cp2_packed": (2, {"packing": True}),
}
TRAIN_BASELINE = "dp2"
TRAIN_METRICS = (
    "loss",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "num_pairs",
    "grad_norm",
)


def _train_worker(hf_dir: str, root: str) -> dict:
    """One training step of the HF model on every layout of TRAIN_LAYOUTS; the steps' metrics."""
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    metrics = {}
    for name, (cp, changes) in TRAIN_LAYOUTS.items():
        cfg = tiny_config(
            load=hf_dir,
            save=os.path.join(root, name),
            context_parallel_size=cp,
            seq_length=36,  # 4 chunks of 9 at CP=2
            micro_batch_size=2,
            global_batch_size=4,
            train_iters=1,
            log_interval=1,
            lr=1e-3,
            lr_decay_style="constant",
            clip_grad=0.0,
            adam_eps=1e-2,  # a smooth first update, as in STEP
            sft_weight=0.5,  # token sums over the CP group too
            **changes,
        )
        metrics[name] = pretrain(cfg)["train"]
        parallel_state.destroy_model_parallel()
    return metrics


def _full_tensors(ckpt_dir: str, flat_path: str) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, flat_path)
    return {k: v for k, v in torch.load(flat_path, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def trained(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    metrics = run_distributed(_train_worker, 2, hf_dirs["mixtral"], str(root))[-1]
    tensors = {n: _full_tensors(str(root / n / "iter_0000001"), str(root / f"{n}.pt")) for n in TRAIN_LAYOUTS}
    return metrics, tensors


@pytest.mark.parametrize("name", [n for n in TRAIN_LAYOUTS if n != TRAIN_BASELINE])
def test_moe_step_packed_cp2_and_chunked_head_equal_padded(trained, name):
    metrics, tensors = trained
    base, mine = tensors[TRAIN_BASELINE], tensors[name]
    assert metrics[TRAIN_BASELINE]["num_pairs"] == 4
    for key in TRAIN_METRICS:
        assert metrics[name][key] == pytest.approx(metrics[TRAIN_BASELINE][key], rel=1e-5, abs=1e-6), key
    params = [k for k in base if not k.startswith("optimizer.")]
    first_moments = [k for k in base if k.startswith("optimizer.state.exp_avg.")]
    assert len(first_moments) == len(params)
    assert any("router" in k for k in first_moments) and any("experts" in k for k in first_moments)
    for key in first_moments:  # (1 - beta1) x gradient
        assert base[key].abs().max() > 0, key
        torch.testing.assert_close(mine[key], base[key], rtol=1e-4, atol=1e-7, msg=key)
    for key in params:
        torch.testing.assert_close(mine[key], base[key], rtol=1e-5, atol=1e-6, msg=key)


def _tokens_at_the_experts_worker() -> dict:
    """How many (token, expert) rows reach the experts in a forward of a padded and a packed
    micro-batch of the same pairs, and how many real tokens the micro-batch holds."""
    import numpy as np

    from simpo_megatron.config import LossConfig
    from simpo_megatron.data.batch import BatchLayout, collate
    from simpo_megatron.model.gpt import build_model
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.step import forward_step

    cfg = tiny_config(num_layers=2, num_experts=4, moe_router_topk=2)
    initialize_distributed(ParallelLayout(1, 1))
    model = build_model(cfg.model, ParallelLayout(1, 1), cfg.padded_vocab_size())[0]
    arrived = []
    for module in model.modules():
        if type(module).__name__ == "SequentialMLP":
            module.register_forward_pre_hook(lambda _, args: arrived.append(int(args[0].shape[0])))
    rng = np.random.default_rng(0)
    pairs = [
        {k: rng.integers(3, 200, n) for k, n in (("prompt", p), ("chosen", c), ("rejected", r))}
        for p, c, r in ((3, 5, 2), (6, 1, 9))
    ]
    out = {}
    for name, layout in {
        "padded": BatchLayout(0, seq_length=32),
        "packed": BatchLayout(0, packed=True, pad_to_multiple_of=64),
    }.items():
        batch = collate(pairs, layout)
        arrived.clear()
        with torch.no_grad():
            forward_step(LossConfig(), 200, iter([batch]), model)
        out[name] = {"arrived": sum(arrived), "real": batch.num_tokens, "slots": batch.tokens.numel()}
    return out


def test_padding_reaches_no_expert():
    """Every real token reaches its top-2 experts in each of the 2 layers; no padding token does
    (rows padded to 32 and a packed row with its padded tail hold 2.5x and 2x the real tokens)."""
    results = run_distributed(_tokens_at_the_experts_worker, 1)[0]
    for name, r in results.items():
        assert r["slots"] > 1.5 * r["real"], name  # the padding is there
        assert r["arrived"] == 2 * 2 * r["real"], (name, r)
