"""DPO on a mixture of experts equals TRL's DPOTrainer, router loss included, step for step.

test_trl_moe_equivalence's tiny Qwen3-30B-A3B-shaped Qwen3-MoE (8 experts, top-2 renormalized,
``router_aux_loss_coef`` 0.5 with ``output_router_logits``) and pairs; the loss is DPO (sigmoid),
its reference the starting weights, scored once before the first step by our own forward (on
the run's layout, packed on the local layers: routing is per token, so packing changes nothing)
and by TRL's ``precompute_ref_log_probs``. Both add 0.5 x HF's load-balancing loss of each
micro-batch; both run a step as 2 micro-batches of 2 pairs (TRL: gradient accumulation 2), on
one process, DP=2 x EP=2 with the distributed optimizer and PP=2. Compared: the reference
scores, per step the loss, rewards, margins, accuracies (once the policy has moved), log-probs,
the logged router loss and the gradient norm; every final weight.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_trl_dpo_equivalence import _scores
from test_trl_equivalence import (
    GLOBAL_BATCH,
    STEPS,
    TRL_TRAINING_ARGS,
    _config,
    _our_metrics,
    _stream,
    make_pairs,
    preprocess,
)
from test_trl_moe_equivalence import AUX, METRIC_ATOL, METRIC_RTOL, WEIGHT_ATOL, _export, _hf_weights, make_moe_hf_dir

from simpo_megatron.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BETA = 0.5
MICRO = 2
# world -> name -> (TP, PP, micro-batch size, distributed optimizer, other flags).
LAYOUTS = {
    1: {"tp1_2mb": (1, 1, MICRO, False, {})},
    2: {"ep2_distopt": (1, 1, MICRO, True, {"expert_model_parallel_size": 2}), "pp2": (1, 2, MICRO, False, {})},
}
NAMES = [n for layouts in LAYOUTS.values() for n in layouts]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _train_worker(layouts: dict, hf_dir: str, prefix: str, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    out = {}
    for name, (tp, pp, mbs, distopt, extra) in layouts.items():
        save = os.path.join(root, name)
        loss = dict(loss_type="dpo", beta=BETA, label_smoothing=0.0, sft_weight=0.0, gamma_beta_ratio=0.5)
        cfg = _config(
            hf_dir, prefix, save, tp, pp, mbs, distopt, {**extra, **loss, "ref_scores_dir": save + "/reference"}
        )
        out.setdefault("stream", _stream(cfg))
        pretrain(cfg)
        parallel_state.destroy_model_parallel()
    return out


def _run_trl(hf_dir: str, pairs: list[dict], stream: list[list[dict]], out: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # TRL tokenizes a plain prompt as it is: its BOS is given as text, as our tool adds it.
    ordered = [{**pairs[s["index"]], "prompt": "<s> " + pairs[s["index"]]["prompt"]} for step in stream for s in step]
    args = DPOConfig(
        output_dir=out,
        loss_type=["sigmoid"],
        beta=BETA,
        precompute_ref_log_probs=True,
        **{
            **TRL_TRAINING_ARGS,
            "per_device_train_batch_size": MICRO,
            "gradient_accumulation_steps": GLOBAL_BATCH // MICRO,
        },
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == AUX
    rows = [dict(r) for r in trainer.train_dataset]
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"rows": rows, "logs": logs, "weights": _hf_weights(os.path.join(out, "final"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trl_moe_dpo")
    hf_dir = make_moe_hf_dir(root / "hf")
    pairs = make_pairs()
    prefix = preprocess(pairs, hf_dir, root)
    stream = None
    for world, layouts in LAYOUTS.items():
        out = run_distributed(_train_worker, world, layouts, hf_dir, prefix, str(root))[-1]
        stream = stream or out["stream"]
    return {
        "initial": _hf_weights(hf_dir),
        "stream": stream,
        "trl": _run_trl(hf_dir, pairs, stream, str(root / "trl")),
        "metrics": {n: _our_metrics(root / n) for n in NAMES},
        "weights": {n: _hf_weights(_export(root / n, hf_dir, root / f"{n}_hf")) for n in NAMES},
        "scores": {n: _scores(root / n) for n in NAMES},
    }


@pytest.mark.parametrize("name", NAMES)
def test_reference_scores_equal_trls_precomputed_ones(runs, name):
    samples = [s for step in runs["stream"] for s in step]
    scores = runs["scores"][name]
    for row, sample in zip(runs["trl"]["rows"], samples, strict=True):
        assert row["prompt_ids"] == sample["prompt"]
        i = sample["index"]
        assert scores[i, 2:].tolist() == [len(sample["chosen"]), len(sample["rejected"])]
        np.testing.assert_allclose(scores[i, :2], [row["ref_chosen_logps"], row["ref_rejected_logps"]], atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_per_step_metrics_equal_trl(runs, name):
    trl, ours = runs["trl"]["logs"], runs["metrics"][name]
    assert len(trl) == len(ours) == STEPS
    pairs = [("load_balancing_loss", "aux_loss"), ("grad_norm", "grad_norm"), *((k, k) for k in METRICS)]
    for mine_key, trl_key in pairs:
        mine, theirs = (
            torch.tensor([r[k] for r in rows], dtype=torch.float64) for rows, k in ((ours, mine_key), (trl, trl_key))
        )
        torch.testing.assert_close(
            mine, theirs, atol=METRIC_ATOL, rtol=METRIC_RTOL, msg=lambda m, k=mine_key: f"{name}: {k}\n{m}"
        )
    # While the policy is the reference every reward is 0 and an accuracy a tie broken by rounding.
    moved = [i for i, r in enumerate(trl) if abs(r["rewards/chosen"]) + abs(r["rewards/rejected"]) > 1e-4]
    assert len(moved) >= STEPS - 2
    assert [ours[i]["rewards/accuracies"] for i in moved] == pytest.approx(
        [trl[i]["rewards/accuracies"] for i in moved]
    )


@pytest.mark.parametrize("name", NAMES)
def test_final_weights_equal_trl(runs, name):
    trl, ours, initial = runs["trl"]["weights"], runs["weights"][name], runs["initial"]
    assert ours.keys() == trl.keys()
    routers = [k for k in trl if k.endswith("mlp.gate.weight")]
    assert routers
    for key, value in trl.items():
        assert (value - initial[key]).abs().max() > 100 * WEIGHT_ATOL, key  # training moved it
        torch.testing.assert_close(ours[key], value, atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {key}")
