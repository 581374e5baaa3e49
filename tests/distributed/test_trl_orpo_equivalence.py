"""``--loss-type orpo --sft-weight 1 --sft-on-prompt`` equals TRL's ORPOTrainer, step for step.

The model, tokenizer, pairs and optimizer settings are those of ``test_trl_equivalence`` (one
tiny random Llama, a word-level tokenizer, eight pairs of different lengths, AdamW with weight
decay, clipping, warmup and linear decay, fp32). TRL's ORPOTrainer minimizes
``nll - beta * mean(logsigmoid(log_odds))``, its NLL being the cross-entropy over every label of
the chosen sequences of its batch, prompt included; ours is the odds-ratio loss plus the
token-level SFT term with weight 1, over the prompt too with ``--sft-on-prompt``. TRL runs the
global batch as one micro-batch on one process; ours runs on one process (2 micro-batches, and
packed), on TP=2, and on CP=2 (padded and packed: the prompt mask per packed sequence, split
over the CP ranks).
Compared per step: the loss, the NLL (our ``sft_loss``), the log-odds metrics, rewards, margins,
accuracies, the averaged log-probs and the gradient norm; after the last step every weight.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_trl_equivalence import (  # the same model, pairs, settings and helpers
    METRIC_ATOL,
    STEPS,
    TRL_TRAINING_ARGS,
    WEIGHT_ATOL,
    _config,
    _our_metrics,
    _our_weights,
    _stream,
    make_hf_dir,
    make_pairs,
    preprocess,
)

from simpo_megatron.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BETA = 0.5
# world -> name -> (TP, PP, micro-batch size, distributed optimizer, other flags).
LAYOUTS = {
    1: {"tp1_2mb": (1, 1, 2, False, {}), "tp1_packed": (1, 1, 2, False, {"packing": True})},
    2: {
        "tp2": (2, 1, 2, False, {}),
        "cp2": (1, 1, 2, False, {"context_parallel_size": 2}),
        "cp2_packed": (1, 1, 2, False, {"context_parallel_size": 2, "packing": True}),
    },
}
NAMES = [n for layouts in LAYOUTS.values() for n in layouts]
# Ours -> TRL's name of each per-step metric.
METRICS = {
    "loss": "loss",
    "sft_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
    "log_odds_chosen": "log_odds_chosen",
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margins": "rewards/margins",
    "rewards/accuracies": "rewards/accuracies",
    "logps/chosen": "logps/chosen",
    "logps/rejected": "logps/rejected",
    "grad_norm": "grad_norm",
}


def _train_worker(layouts: dict, hf_dir: str, prefix: str, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    out = {}
    for name, (tp, pp, mbs, distopt, extra) in layouts.items():
        orpo = {"loss_type": "orpo", "beta": BETA, "label_smoothing": 0.0, "sft_weight": 1.0, "sft_on_prompt": True}
        cfg = _config(hf_dir, prefix, os.path.join(root, name), tp, pp, mbs, distopt, {**extra, **orpo})
        if "stream" not in out:
            out["stream"] = _stream(cfg)
        pretrain(cfg)
        parallel_state.destroy_model_parallel()
    return out


def _run_trl(hf_dir: str, pairs: list[dict], stream: list[list[dict]], out: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError as e:
        pytest.fail(f"TRL is needed for the equivalence with ORPOTrainer ({e}); pip install -e '.[test]'")
    import transformers
    from datasets import Dataset

    ordered = [pairs[s["index"]] for step in stream for s in step]
    args = ORPOConfig(output_dir=out, beta=BETA, **TRL_TRAINING_ARGS)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer)
    rows = [dict(r) for r in trainer.train_dataset]
    trainer.train()
    return {
        "rows": rows,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


def _response_only_nll(hf_dir: str, step: list[dict]) -> float:
    """The first step's NLL over the chosen responses alone, by the HF model (what the SFT term
    is without --sft-on-prompt)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in step:
            ids = torch.tensor([s["prompt"] + s["chosen"]])
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            total -= logps[len(s["prompt"]) - 1 :].sum().item()
            count += len(s["chosen"])
    return total / count


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("trl_orpo")
    hf_dir = make_hf_dir(root / "hf")
    pairs = make_pairs()
    prefix = preprocess(pairs, hf_dir, root)
    stream = None
    for world, layouts in LAYOUTS.items():
        out = run_distributed(_train_worker, world, layouts, hf_dir, prefix, str(root))[-1]
        stream = stream or out["stream"]
    return {
        "initial": load_file(os.path.join(hf_dir, "model.safetensors")),
        "stream": stream,
        "trl": _run_trl(hf_dir, pairs, stream, str(root / "trl_out")),
        "response_only_nll": _response_only_nll(hf_dir, stream[0]),
        "metrics": {n: _our_metrics(root / n) for n in NAMES},
        "weights": {n: _our_weights(root / n, hf_dir, root / f"{n}_hf") for n in NAMES},
    }


def test_trl_rows_hold_our_token_ids_and_its_nll_covers_the_prompt(runs):
    ours = [s for step in runs["stream"] for s in step]
    for row, sample in zip(runs["trl"]["rows"], ours, strict=True):
        assert row["chosen_input_ids"] == sample["prompt"] + sample["chosen"]
        assert row["rejected_input_ids"] == sample["prompt"] + sample["rejected"]
    # The prompt tokens change TRL's NLL: a response-only SFT term is another objective.
    first = runs["trl"]["logs"][0]["nll_loss"]
    assert abs(first - runs["response_only_nll"]) > 1e-2, (first, runs["response_only_nll"])


@pytest.mark.parametrize("name", NAMES)
def test_per_step_metrics_equal_trl(runs, name):
    trl, ours = runs["trl"]["logs"], runs["metrics"][name]
    assert len(trl) == len(ours) == STEPS
    for key, trl_key in METRICS.items():
        mine, theirs = (
            torch.tensor([r[k] for r in rows], dtype=torch.float64) for rows, k in ((ours, key), (trl, trl_key))
        )
        rtol = 1e-5 if key == "grad_norm" else 1e-6
        torch.testing.assert_close(mine, theirs, atol=METRIC_ATOL, rtol=rtol, msg=lambda m, k=key: f"{name}: {k}\n{m}")
    assert len({r["rewards/accuracies"] for r in trl}) > 1  # the run learns something


@pytest.mark.parametrize("name", NAMES)
def test_final_weights_equal_trl(runs, name):
    trl, ours, initial = runs["trl"]["weights"], runs["weights"][name], runs["initial"]
    assert ours.keys() == trl.keys()
    for key, value in trl.items():
        assert (value - initial[key]).abs().max() > 100 * WEIGHT_ATOL, key
        torch.testing.assert_close(ours[key], value, atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {key}")
