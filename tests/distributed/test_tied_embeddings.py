"""Tied input and output embeddings train the same on one stage and across pipeline stages.

With PP > 1 the first stage holds the word embeddings and the last stage a copy of them as its
output weight; megatron-core sums the two copies' gradients over the embedding group
(``finalize_model_grads``) so both apply the same update. Two tied tiny models, a Qwen2-shaped
one and a Gemma-2 one (scaled embeddings, soft-capped attention and output logits, sandwich
and (1 + w) norms, GeGLU, a sliding window on every other layer), load the same weights and
take one Adam step on the same global batch through the real training loop at PP=1, PP=2,
and interleaved PP=2 (VPP) with the chunked log-prob head. Compared against PP=1: the loss and
metrics (the gradient norm counts the shared matrix once), each stage's copy of the tied
matrix and its gradient after the step (read in the workers), every saved parameter and Adam
first moment ((1 - beta1) x gradient), and the Hugging Face export of each checkpoint.
"""

import os

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, save_reference_weights, tiny_config

pytestmark = pytest.mark.distributed

MODELS = {
    "qwen2": {"add_qkv_bias": True},
    "gemma2": {
        "swiglu": False,
        "geglu": True,
        "apply_layernorm_1p": True,
        "sandwich_norm": True,
        "scale_embeddings": True,
        "softmax_scale": 0.2,
        # Caps near the tiny model's logits, so that both soft-caps bend them.
        "attn_logit_softcapping": 0.5,
        "final_logit_softcapping": 0.3,
        "sliding_window": 8,
        "window_attn_skip_freq": 2,
    },
}
# name: (PP, layers per virtual pipeline stage, micro-batch size, other config fields).
BY_WORLD = {
    1: {"pp1": (1, None, 2, {})},
    2: {
        "pp2": (2, None, 1, {}),
        "pp2_vpp2_chunked": (2, 1, 1, {"logprob_chunk_size": 7}),
    },
}
BASELINE = "pp1"


def _config(model: str, pp: int, vpp_layers, mbs: int, **kw):
    return tiny_config(
        untie_embeddings_and_output_weights=False,
        **MODELS[model],
        pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=vpp_layers,
        micro_batch_size=mbs,
        global_batch_size=4,
        lr=1e-3,
        clip_grad=1.0,
        lr_decay_style="constant",
        adam_eps=1e-2,  # keeps Adam's first update smooth in the gradient (see test_layouts.py)
        train_iters=1,
        log_interval=1,
        **kw,
    )


def _tied_copies(state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """This rank's copies of the tied matrix, ``first`` (the embedding) and ``last`` (the output
    weight of a later stage): ``(weight, gradient)`` after the step."""
    copies = {}
    for chunk in state.model:
        model = chunk.module
        if model.pre_process or model.post_process:
            weight = model.shared_embedding_or_output_weight()
            copies["first" if model.pre_process else "last"] = (weight.detach().clone(), weight.main_grad.clone())
    return copies


def _run(layouts: dict, root: str, build_reference: bool):
    from megatron.core import parallel_state

    from simpo_megatron.training import loop

    copies = {}
    train_step = loop.train_step

    def recording_train_step(cfg, state, batches):
        result = train_step(cfg, state, batches)
        copies[run] = _tied_copies(state)
        return result

    loop.train_step = recording_train_step
    summaries = {}
    for model in MODELS:
        ref = os.path.join(root, model, "reference")
        if build_reference:
            save_reference_weights(_config(model, 1, None, 1), ref)
            parallel_state.destroy_model_parallel()
        for name, (pp, vpp_layers, mbs, extra) in layouts.items():
            run = f"{model}/{name}"
            cfg = _config(model, pp, vpp_layers, mbs, load=ref, save=os.path.join(root, run), **extra)
            summaries[run] = loop.pretrain(cfg)["train"]
            parallel_state.destroy_model_parallel()
    return summaries, copies


def _full_tensors(ckpt_dir: str, flat_path: str) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, flat_path)
    return {k: v for k, v in torch.load(flat_path, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    root = tmp_path_factory.mktemp("tied")
    metrics, copies = {}, {}
    for world, layouts in BY_WORLD.items():
        for rank, (summaries, rank_copies) in enumerate(run_distributed(_run, world, layouts, str(root), world == 1)):
            if rank == world - 1:
                metrics.update(summaries)
            for run, by_stage in rank_copies.items():
                copies.setdefault(run, {}).update(by_stage)
    tensors, exported = {}, {}
    for run in metrics:
        flat = str(root / f"{run.replace('/', '_')}.pt")
        tensors[run] = _full_tensors(str(root / run / "iter_0000001"), flat)
        with pytest.warns(UserWarning, match="no HF config"):
            out = export_checkpoint(str(root / run), str(root / "hf" / run))
        exported[run] = load_file(os.path.join(out, "model.safetensors"))
    return metrics, copies, tensors, exported


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "num_pairs", "grad_norm")
CASES = [(model, name) for model in MODELS for layouts in BY_WORLD.values() for name in layouts if name != BASELINE]


@pytest.mark.parametrize("model,name", CASES)
def test_pipeline_stages_train_the_tied_matrix_like_one_stage(runs, model, name):
    metrics, copies, _, _ = runs
    base, mine = metrics[f"{model}/{BASELINE}"], metrics[f"{model}/{name}"]
    assert base["num_pairs"] == 4
    for key in METRICS:
        assert mine[key] == pytest.approx(base[key], rel=1e-5, abs=1e-6), key

    ((weight, grad),) = copies[f"{model}/{BASELINE}"].values()
    stages = copies[f"{model}/{name}"]
    assert set(stages) == {"first", "last"}
    assert grad.abs().max() > 0
    for stage, (stage_weight, stage_grad) in stages.items():
        # The gradient is the sum of the embedding's and the output layer's parts.
        torch.testing.assert_close(stage_grad, grad, rtol=1e-4, atol=1e-7, msg=f"{stage} stage's gradient")
        torch.testing.assert_close(stage_weight, weight, rtol=1e-5, atol=1e-6, msg=f"{stage} stage's weight")


@pytest.mark.parametrize("model,name", CASES)
def test_saved_parameters_moments_and_hf_export_match_one_stage(runs, model, name):
    _, _, tensors, exported = runs
    base, mine = tensors[f"{model}/{BASELINE}"], tensors[f"{model}/{name}"]
    params = [k for k in base if not k.startswith("optimizer.")]
    moments = [k for k in base if k.startswith("optimizer.state.exp_avg.")]
    assert len(moments) == len(params) > 5
    assert not any("output_layer" in k for k in params)  # tied: one matrix in the checkpoint
    assert set(mine) >= set(params) | set(moments)
    for key in moments:
        assert base[key].abs().max() > 0, key
        torch.testing.assert_close(mine[key], base[key], rtol=1e-4, atol=1e-7, msg=key)
    for key in params:
        torch.testing.assert_close(mine[key], base[key], rtol=1e-5, atol=1e-6, msg=key)

    hf_base, hf_mine = exported[f"{model}/{BASELINE}"], exported[f"{model}/{name}"]
    assert "lm_head.weight" not in hf_mine and set(hf_mine) == set(hf_base)
    for key in hf_base:
        torch.testing.assert_close(hf_mine[key], hf_base[key], rtol=1e-5, atol=1e-6, msg=key)
