"""--eval-iters -1 scores every validation pair exactly once, the last partial global batch
included, on every layout: data-parallel ranks that get fewer pairs or none, micro-batches
that are short or empty, pipeline stages; the pair-weighted means equal an independent
per-pair computation over the same pairs on one process.

The mock validation set has 256 pairs; with a global batch of 12 the last one holds 4 pairs,
so with DP=2 and micro-batches of 2 the second rank gets none in it.
"""

import os

import pytest
import torch

from simpo_megatron.testing import run_distributed, save_reference_weights, tiny_config

BETA, RATIO, GBS = 2.0, 0.5, 12
# name: (TP, PP, micro-batch size)
BY_WORLD = {
    1: {"one_rank": (1, 1, 4)},
    2: {"dp2_mbs2": (1, 1, 2), "dp2_mbs1": (1, 1, 1), "pp2": (1, 2, 2)},
}
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _config(tp, pp, mbs, **kw):
    return tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        micro_batch_size=mbs,
        global_batch_size=GBS,
        beta=BETA,
        gamma_beta_ratio=RATIO,
        **kw,
    )


@torch.no_grad()
def _per_pair(cfg, state) -> dict[str, list[float]]:
    """Every validation pair's loss, rewards, accuracy and log-probs, straight from the logits."""
    import torch.nn.functional as F
    from megatron.core.utils import unwrap_model

    from simpo_megatron.data.batch import BatchLayout, collate
    from simpo_megatron.data.provider import build_datasets

    data = build_datasets(cfg)
    module = unwrap_model(state.model[0]).eval()
    values = {key: [] for key in METRICS}
    for start in range(0, len(data.valid), 32):
        samples = [data.valid[i] for i in range(start, min(start + 32, len(data.valid)))]
        batch = collate(samples, BatchLayout(data.pad_id, seq_length=cfg.data.seq_length))
        logits = module(batch.tokens, batch.position_ids, attention_mask=None, labels=None)
        logps = torch.log_softmax(logits[..., : cfg.model.vocab_size].float(), -1)
        logps = logps.gather(-1, batch.labels[..., None]).squeeze(-1)
        mask = batch.loss_mask
        seq = (logps * mask).sum(-1) / mask.sum(-1)
        m = len(samples)
        chosen, rejected = seq[:m], seq[m:]
        pair = {
            "loss": -F.logsigmoid(BETA * ((chosen - rejected) - RATIO)),
            "rewards/chosen": BETA * chosen,
            "rewards/rejected": BETA * rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": BETA * (chosen - rejected),
            "logps/chosen": chosen,
            "logps/rejected": rejected,
        }
        for key in METRICS:
            values[key] += pair[key].tolist()
    return values


def _run_layouts(layouts: dict, root: str, build_reference: bool):
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    ref = os.path.join(root, "reference")
    results = {}
    if build_reference:
        cfg = _config(1, 1, 4)
        state = save_reference_weights(cfg, ref)
        results["per_pair"] = _per_pair(cfg, state)
        parallel_state.destroy_model_parallel()
    for name, (tp, pp, mbs) in layouts.items():
        for iters in (-1, 2):
            cfg = _config(tp, pp, mbs, load=ref, eval_only=True, eval_iters=iters)
            results[(name, iters)] = pretrain(cfg)["valid"]
            parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    results = {}
    for world, layouts in BY_WORLD.items():
        results.update(run_distributed(_run_layouts, world, layouts, str(root), world == 1)[-1])
    return results


@pytest.mark.parametrize("name", [n for layouts in BY_WORLD.values() for n in layouts])
@pytest.mark.parametrize("iters, num_pairs", [(-1, 256), (2, 2 * GBS)])
def test_evaluation_scores_each_pair_once_with_pair_weighted_means(runs, name, iters, num_pairs):
    assert 256 % GBS  # the last global batch is partial
    mine, per_pair = runs[(name, iters)], runs["per_pair"]
    assert len(per_pair["loss"]) == 256
    assert mine["num_pairs"] == num_pairs
    for key in METRICS:
        expected = sum(per_pair[key][:num_pairs]) / num_pairs
        assert mine[key] == pytest.approx(expected, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("iters", [0, -2])
def test_eval_iters_is_validated(iters):
    from simpo_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="--eval-iters"):
        tiny_config(eval_iters=iters).validate(1)
