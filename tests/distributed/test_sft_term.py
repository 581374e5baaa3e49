"""The token-level SFT term through real training steps, against nn.CrossEntropyLoss on the
same logits, on several layouts and micro-batch splits.

The reference weights are built once; an independent computation on one process runs the
model on the first global batch and takes SimPO's mean over pairs plus sft_weight x the
cross-entropy over all chosen-response tokens (the SimPO repository's and TRL's form), with
autograd for its gradient. Every layout then takes one Adam step on the same global batch
through the real loop: its reported loss and sft_loss must equal the independent values, and
Adam's first moment ((1 - beta1) x gradient) must equal the independent gradient.
"""

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, save_reference_weights, tiny_config

SFT_WEIGHT, BETA, RATIO, ADAM_BETA1 = 0.5, 2.0, 0.5, 0.9
# name: (TP, PP, micro-batch size); global batch 4 pairs throughout.
BY_WORLD = {
    1: {"one_micro_batch": (1, 1, 4), "four_micro_batches": (1, 1, 1)},
    2: {"dp2_two_micro_batches": (1, 1, 1), "dp2_one_micro_batch": (1, 1, 2), "pp2": (1, 2, 1), "tp2": (2, 1, 2)},
}
CHECKED_GRADS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _config(tp, pp, mbs, **kw):
    return tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        micro_batch_size=mbs,
        global_batch_size=4,
        lr=1e-3,
        clip_grad=0.0,
        lr_decay_style="constant",
        adam_eps=1e-2,
        adam_beta1=ADAM_BETA1,
        beta=BETA,
        gamma_beta_ratio=RATIO,
        sft_weight=SFT_WEIGHT,
        train_iters=1,
        log_interval=1,
        **kw,
    )


def _independent(cfg, state) -> dict:
    """Loss, CE and gradients of the first global batch, computed directly with torch."""
    import torch.nn.functional as F
    from megatron.core.utils import unwrap_model

    from simpo_megatron.data.provider import build_datasets, micro_batches

    data = build_datasets(cfg)
    batch = next(micro_batches(data.train, cfg, data.pad_id, 0, 0, 1))  # all 4 pairs at once
    module = unwrap_model(state.model[0])
    for m in state.model:
        m.zero_grad_buffer()
    logits = module(batch.tokens, batch.position_ids, attention_mask=None, labels=None)
    logits = logits[..., : cfg.model.vocab_size].float()  # drop the vocabulary padding
    labels, mask = batch.labels, batch.loss_mask
    logps = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    seq = (logps * mask).sum(-1) / mask.sum(-1)
    simpo = -F.logsigmoid(BETA * ((seq[:4] - seq[4:]) - RATIO)).mean()
    ignored = torch.where(mask[:4] > 0, labels[:4], -100)
    ce = torch.nn.CrossEntropyLoss()(logits[:4].reshape(-1, cfg.model.vocab_size), ignored.reshape(-1))
    (simpo + SFT_WEIGHT * ce).backward()
    params = dict(module.named_parameters())
    grads = {name: params[name].main_grad.detach().clone()[: cfg.model.vocab_size] for name in CHECKED_GRADS}
    lengths = mask[:4].sum(-1).tolist()
    return {"loss": (simpo + SFT_WEIGHT * ce).item(), "sft_loss": ce.item(), "grads": grads, "lengths": lengths}


def _run_layouts(layouts: dict, root: str, build_reference: bool):
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    ref = os.path.join(root, "reference")
    results = {}
    if build_reference:
        cfg = _config(1, 1, 4)
        state = save_reference_weights(cfg, ref)
        results["independent"] = _independent(cfg, state)
        parallel_state.destroy_model_parallel()
    for name, (tp, pp, mbs) in layouts.items():
        cfg = _config(tp, pp, mbs, load=ref, save=os.path.join(root, name))
        results[name] = pretrain(cfg)["train"]
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    results = {}
    for world, layouts in BY_WORLD.items():
        results.update(run_distributed(_run_layouts, world, layouts, str(root), world == 1)[-1])
    moments = {}
    for name in (n for layouts in BY_WORLD.values() for n in layouts):
        flat = str(root / f"{name}.pt")
        dcp_to_torch_save(str(root / name / "iter_0000001"), flat)
        state = torch.load(flat, weights_only=False)
        moments[name] = {k: state[f"optimizer.state.exp_avg.{k}"] for k in CHECKED_GRADS}
    return results, moments


def test_reference_batch_has_chosen_responses_of_different_lengths(runs):
    results, _ = runs
    assert len(set(results["independent"]["lengths"])) > 1  # else token and pair forms agree


@pytest.mark.parametrize("name", [n for layouts in BY_WORLD.values() for n in layouts])
def test_sft_term_loss_and_gradient_equal_the_token_level_cross_entropy(runs, name):
    results, moments = runs
    independent, mine = results["independent"], results[name]
    assert mine["num_pairs"] == 4
    assert mine["sft_loss"] == pytest.approx(independent["sft_loss"], rel=1e-5)
    assert mine["loss"] == pytest.approx(independent["loss"], rel=1e-5)
    for key in CHECKED_GRADS:
        grad = moments[name][key][: independent["grads"][key].shape[0]] / (1 - ADAM_BETA1)
        assert independent["grads"][key].abs().max() > 0
        torch.testing.assert_close(grad, independent["grads"][key], rtol=1e-4, atol=1e-7, msg=key)
