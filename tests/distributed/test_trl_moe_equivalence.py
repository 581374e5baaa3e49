"""A Qwen3-30B-A3B-shaped MoE trains with SimPO as TRL's CPOTrainer does, router loss included.

A tiny random Qwen3-MoE (transformers' own class: QK-norm, grouped-query attention, 8 experts,
top-2 with renormalized weights, untied embeddings), ``output_router_logits=True`` and
``router_aux_loss_coef`` AUX: TRL's CPOTrainer(simpo) then adds AUX x the model's
load-balancing loss (HF's, over the real tokens of the batch it runs, padding left out) to each
batch's loss. The pairs, tokenizer and run settings are test_trl_equivalence's, except that the
SFT term is off and both trainers run a step as 2 micro-batches of 2 pairs: TRL with gradient
accumulation 2, we with 2 micro-batches on 1 process (padded, and packed), DP=2 with the
distributed optimizer and EP=2, TP=2, CP=2, PP=2, TP=2 x EP=2 x DP=2 (world 4) and
TP=2 x EP=2 x PP=2 (world 8). The load-balancing
loss is a function of a micro-batch's tokens as a whole, so the micro-batches must be the same
pairs; the SimPO mean over pairs is the same either way. Compared per step: loss, reward
metrics, summed log-probs and gradient norm; after 8 steps, every weight, experts' and routers'
included.

Our ``--load HF_DIR`` takes the coefficient from the config (``output_router_logits``). The
logged ``load_balancing_loss`` of step 1 (the initial weights) is checked against transformers'
own ``aux_loss`` of each micro-batch. A second TRL run without the router loss ends far from the
first, so the loss matters at this coefficient. Under pipeline parallelism each stage holds one
of the two layers, whose routing HF's loss couples: the stages exchange their statistics.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_trl_equivalence import (
    GLOBAL_BATCH,
    METRICS,
    TRL_TRAINING_ARGS,
    _config,
    _our_metrics,
    _stream,
    _trl,
    make_hf_dir,
    make_pairs,
    preprocess,
)

from simpo_megatron.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BETA, GAMMA_BETA_RATIO, LABEL_SMOOTHING = 2.5, 0.4, 0.1
EXPERTS, TOPK, AUX = 8, 2, 0.5
SP = {"sequence_parallel": True}  # megatron-core's MoE layer trains on TP > 1 only with it
# name -> (TP, PP, micro-batch size, distributed optimizer[, other flags]); DP = world / (TP x PP).
LAYOUTS = {
    1: {"tp1_2mb": (1, 1, 2, False), "tp1_packed": (1, 1, 2, False, {"packing": True})},
    2: {
        "ep2_distopt": (1, 1, 2, True, {"expert_model_parallel_size": 2}),
        "tp2_sp": (2, 1, 2, False, SP),
        "cp2": (1, 1, 2, False, {"context_parallel_size": 2}),
        "pp2": (1, 2, 2, False),
    },
    4: {"tp2_sp_ep2_distopt": (2, 1, 2, True, {**SP, "expert_model_parallel_size": 2})},
    8: {"tp2_sp_ep2_pp2": (2, 2, 2, True, {**SP, "expert_model_parallel_size": 2})},
}
NAMES = [n for layouts in LAYOUTS.values() for n in layouts]
# fp32. Measured over the 8 steps and 7 layouts: relative differences of 1e-6 to 1.2e-4 (the
# largest, 4.5e-4, in a gradient norm of 3.8 at step 8, where one process without the router
# loss is 2.9e-4 off too; 8e-5 in a margin of 2.7), weights within
# 1.5e-5 (a few elements whose Adam update, about lr = 3e-3 x sign, rounding can move). That is
# roundings that the routers' top-k and Adam amplify over the steps. Real differences are orders
# larger: the router loss of the whole batch instead of each micro-batch's moves step 1's loss by
# 0.01; without the router loss the routers end more than 100 x WEIGHT_ATOL away.
METRIC_ATOL, METRIC_RTOL = 5e-5, 2e-4
WEIGHT_ATOL = 2e-5


def make_moe_hf_dir(path: Path) -> str:
    """test_trl_equivalence's tokenizer with a tiny Qwen3-MoE in place of its Llama."""
    import transformers

    make_hf_dir(path)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        if (path / name).exists():
            (path / name).unlink()
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=EXPERTS,
        num_experts_per_tok=TOPK,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=AUX,
        vocab_size=200,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # norms away from the identity, router logits of O(1): no near ties
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.5 if "gate" in name else 0.1)
    model.save_pretrained(path)
    return str(path)


def _moe_config(hf_dir, prefix, save, tp, pp, mbs, distopt, extra=None):
    loss = dict(beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO, label_smoothing=LABEL_SMOOTHING, sft_weight=0.0)
    return _config(hf_dir, prefix, save, tp, pp, mbs, distopt, {**loss, **(extra or {})})


def _train_worker(layouts: dict, hf_dir: str, prefix: str, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain, resolve_config

    out = {}
    for name, layout in layouts.items():
        cfg = _moe_config(hf_dir, prefix, os.path.join(root, name), *layout)
        assert resolve_config(cfg)[0].model.moe_aux_loss_coeff == AUX  # the HF config's
        assert resolve_config(cfg.replace(moe_aux_loss_coeff=0.0))[0].model.moe_aux_loss_coeff == 0.0  # a flag wins
        if name == "tp1_2mb":
            out["stream"] = _stream(cfg)
        pretrain(cfg)
        parallel_state.destroy_model_parallel()
    return out


def _run_trl(hf_dir: str, pairs: list[dict], stream: list[list[dict]], out: str, aux: bool, micro: int = 2) -> dict:
    """CPOTrainer(simpo) on one process, a step of GLOBAL_BATCH pairs in micro-batches of ``micro``, in our order."""
    CPOConfig, CPOTrainer = _trl()
    import transformers
    from datasets import Dataset

    ordered = [pairs[s["index"]] for step in stream for s in step]
    args = CPOConfig(
        output_dir=out,
        loss_type="simpo",
        beta=BETA,
        simpo_gamma=BETA * GAMMA_BETA_RATIO,
        label_smoothing=LABEL_SMOOTHING,
        cpo_alpha=0.0,
        **{
            **TRL_TRAINING_ARGS,
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": GLOBAL_BATCH // micro,
        },
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.config.output_router_logits = aux
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer)
    assert trainer.aux_loss_enabled == aux and trainer.aux_loss_coef == AUX
    trainer.loss_is_scaled_for_ga = False  # each micro-batch's mean loss / 2, as transformers does for CPO
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"logs": logs, "weights": _hf_weights(os.path.join(out, "final"))}


def _hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """The tensors of an HF directory as transformers loads them (its fused expert layout)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step1_aux(hf_dir: str, stream: list[list[dict]], micro: int) -> float:
    """transformers' aux_loss of step 1's micro-batches of ``micro`` pairs (the initial weights), averaged."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    losses = []
    for first in range(0, GLOBAL_BATCH, micro):
        part = stream[0][first : first + micro]
        rows = [s["prompt"] + s[side] for side in ("chosen", "rejected") for s in part]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            losses.append(float(model(ids, attention_mask=mask, output_router_logits=True).aux_loss))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    _trl()
    root = tmp_path_factory.mktemp("trl_moe")
    hf_dir = make_moe_hf_dir(root / "hf")
    pairs = make_pairs()
    prefix = preprocess(pairs, hf_dir, root)
    ours = {}
    for world, layouts in LAYOUTS.items():
        ours.update(run_distributed(_train_worker, world, layouts, hf_dir, prefix, str(root))[-1])
    stream = ours["stream"]
    return {
        "initial": _hf_weights(hf_dir),
        "trl": _run_trl(hf_dir, pairs, stream, str(root / "trl"), aux=True),
        "trl_whole": _run_trl(hf_dir, pairs, stream, str(root / "trl_whole"), aux=True, micro=GLOBAL_BATCH),
        "trl_no_aux": _run_trl(hf_dir, pairs, stream, str(root / "trl_no_aux"), aux=False),
        "step1_aux": {micro: _step1_aux(hf_dir, stream, micro) for micro in (2, GLOBAL_BATCH)},
        "metrics": {n: _our_metrics(root / n) for n in NAMES},
        "weights": {n: _hf_weights(_export(root / n, hf_dir, root / f"{n}_hf")) for n in NAMES},
    }


def _export(save: Path, hf_dir: str, out: Path) -> str:
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    return export_checkpoint(str(save), str(out), hf_config_dir=hf_dir)


def _reference(runs, name: str) -> dict:
    """The TRL run ``name`` must equal: the packed run packs each step's 4 pairs (at most 111
    tokens) into one micro-batch (a budget of 2 x 2 x 32 tokens), so its router loss is that
    of the whole batch, as TRL computes it without gradient accumulation."""
    return runs["trl_whole"] if "packed" in name else runs["trl"]


def _prefixed(where: str):
    """assert_close's message: ``where``, then its own account of the differences."""
    return lambda message: f"{where}: {message}"


@pytest.mark.parametrize("name", NAMES)
def test_per_step_losses_and_reward_metrics_equal_trl(runs, name):
    trl, ours = _reference(runs, name)["logs"], runs["metrics"][name]
    for key in METRICS + ("grad_norm",):
        mine, theirs = (torch.tensor([r[key] for r in rows], dtype=torch.float64) for rows in (ours, trl))
        torch.testing.assert_close(mine, theirs, atol=METRIC_ATOL, rtol=METRIC_RTOL, msg=_prefixed(f"{name}: {key}"))


@pytest.mark.parametrize("name", NAMES)
def test_final_weights_equal_trl(runs, name):
    trl, ours, initial = _reference(runs, name)["weights"], runs["weights"][name], runs["initial"]
    assert ours.keys() == trl.keys() == initial.keys()
    for key, value in trl.items():
        assert (value - initial[key]).abs().max() > 100 * WEIGHT_ATOL, key  # training moved it
        torch.testing.assert_close(ours[key], value, atol=WEIGHT_ATOL, rtol=0, msg=_prefixed(f"{name}: {key}"))


def test_the_router_loss_is_hfs_and_changes_training(runs):
    """Step 1's logged load-balancing loss is transformers' aux_loss of its micro-batches; the
    runs report it every step, and without it TRL's routers end far from where they end with it."""
    for name in NAMES:
        rows = runs["metrics"][name]
        assert all(r["load_balancing_loss"] > 0 for r in rows), name
        expected = runs["step1_aux"][GLOBAL_BATCH if "packed" in name else 2]
        assert rows[0]["load_balancing_loss"] == pytest.approx(expected, rel=1e-5, abs=0), name
    # The two groupings of the same pairs give different router losses (HF's is not additive).
    assert abs(runs["step1_aux"][2] - runs["step1_aux"][GLOBAL_BATCH]) > 1e-3
    with_aux, without = runs["trl"]["weights"], runs["trl_no_aux"]["weights"]
    routers = [k for k in with_aux if k.endswith("mlp.gate.weight")]
    assert routers and all((with_aux[k] - without[k]).abs().max() > 100 * WEIGHT_ATOL for k in routers)
