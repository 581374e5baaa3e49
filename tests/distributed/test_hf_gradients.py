"""Forward and backward parity with transformers on padded batches, one process for every family.

Each family's tiny HF model (Llama, Mistral with a sliding window of 4 tokens on 16-token rows,
Qwen2 with tied embeddings, Gemma-2) is loaded into the Megatron model; both take the same
right-padded rows (transformers with its attention mask), and the gradient of the same weighted
sum of response-token log-probs is taken on each side. Megatron's gradients go through the
export adapter (written into the weights, saved, read back and mapped with ``megatron_to_hf``),
so they are compared under the HF names, every HF tensor included. Gemma-2 also runs in bf16 on
both sides (forward), within bf16 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from test_hf_interop import VOCAB, _by_value, _config, _to_torch, hf_model

from simpo_megatron.testing import run_distributed

pytestmark = pytest.mark.distributed

SEQ, ROWS = 16, 4
FAMILIES = ("llama", "mistral", "qwen2_tied", "gemma2")
MISTRAL_WINDOW = 4  # shorter than the rows: the window takes effect


def _make(kind: str, path) -> str:
    torch.manual_seed(FAMILIES.index(kind))
    model = hf_model(kind, **({"sliding_window": MISTRAL_WINDOW} if kind == "mistral" else {}))
    gemma = kind == "gemma2"
    with torch.no_grad():  # norms away from identity and O(1) logits, as in test_hf_interop
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.3 if gemma else 0.1)
    model.save_pretrained(path)
    return str(path)


def _batch() -> dict[str, torch.Tensor]:
    """Right-padded rows of 16, 13, 9 and 6 real tokens (pad id 0), and per-token loss weights
    on the real labels only."""
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, VOCAB, (ROWS, SEQ + 1), generator=g)
    lengths = torch.tensor([SEQ, 13, 9, 6])
    real = torch.arange(SEQ + 1) < lengths[:, None]
    seqs = seqs.where(real, 0)
    attention = real[:, :-1].long()
    weights = torch.rand(ROWS, SEQ, generator=g) * real[:, 1:]  # a label is real if its token is
    return {"tokens": seqs[:, :-1], "labels": seqs[:, 1:], "attention": attention, "weights": weights}


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _hf(hf_dir: str, batch: dict, dtype=torch.float32) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    logits = model(input_ids=batch["tokens"], attention_mask=batch["attention"]).logits
    (_token_logps(logits, batch["labels"]) * batch["weights"]).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"logits": logits.detach().float(), "grads": grads}


def _worker(hf_dirs: dict, batch: dict, out: str) -> dict:
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from simpo_megatron.hf import load_hf_weights
    from simpo_megatron.hf.sharded import read_checkpoint_tensors
    from simpo_megatron.hf.tensor_mapping import megatron_to_hf
    from simpo_megatron.logprobs import vocab_parallel_token_logps
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import save_checkpoint
    from simpo_megatron.training.trainer import setup_model_and_optimizer

    initialize_distributed(ParallelLayout(1, 1))
    positions = torch.arange(SEQ).expand(ROWS, SEQ).contiguous()
    results = {}
    for name, hf_dir in {**hf_dirs, "gemma2_bf16": hf_dirs["gemma2"]}.items():
        bf16 = name == "gemma2_bf16"
        cfg = _config(hf_dir, 1, 1, bf16=bf16)
        state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
        load_hf_weights(hf_dir, state.model, cfg)
        state.optimizer.reload_model_params()
        output = state.model[0](batch["tokens"], positions, attention_mask=None)  # causal; pads trail
        token_logps = vocab_parallel_token_logps(output, batch["labels"], cfg.model.vocab_size)
        results[name] = {"logits": output.detach().float()[..., :VOCAB]}
        if bf16:
            continue
        (token_logps * batch["weights"]).sum().backward()
        with torch.no_grad():  # the gradients through the export path, under HF names
            for p in unwrap_model(state.model[0]).parameters():
                p.copy_(p.main_grad if getattr(p, "main_grad", None) is not None else p.grad)
        state.iteration = 0
        ckpt = save_checkpoint(os.path.join(out, name), state, weights_only=True)
        results[name]["grads"] = megatron_to_hf(read_checkpoint_tensors(ckpt), cfg.model)
    parallel_state.destroy_model_parallel()
    return _by_value(results)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_gradients")
    hf_dirs = {kind: _make(kind, root / kind) for kind in FAMILIES}
    batch = _batch()
    ours = _to_torch(run_distributed(_worker, 1, hf_dirs, batch, str(root / "out"))[0])
    theirs = {kind: _hf(d, batch) for kind, d in hf_dirs.items()}
    theirs["gemma2_bf16"] = _hf(hf_dirs["gemma2"], batch, torch.bfloat16)
    return hf_dirs, batch, ours, theirs


@pytest.mark.parametrize("kind", FAMILIES)
def test_forward_and_every_gradient_match_transformers_on_padded_rows(runs, kind):
    _, batch, ours, theirs = runs
    real = batch["attention"].bool()
    torch.testing.assert_close(ours[kind]["logits"][real], theirs[kind]["logits"][real], atol=1e-4, rtol=0)
    grads, expected = ours[kind]["grads"], theirs[kind]["grads"]
    # Every HF tensor (a tied lm_head is the embedding's and not exported).
    assert set(grads) == set(expected) - ({"lm_head.weight"} if kind in ("qwen2_tied", "gemma2") else set())
    for key, value in expected.items():
        if key in grads:
            assert value.abs().max() > 0, key
            torch.testing.assert_close(grads[key], value, atol=1e-4, rtol=1e-3, msg=f"{kind} {key}")


def test_mistral_window_takes_effect_in_transformers(runs):
    hf_dirs, batch, _, theirs = runs
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["mistral"], dtype=torch.float32)
    model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model(input_ids=batch["tokens"], attention_mask=batch["attention"]).logits
    late = batch["attention"].bool() & (torch.arange(SEQ) >= MISTRAL_WINDOW)
    assert (unwindowed[late] - theirs["mistral"]["logits"][late]).abs().max() > 1e-2


def test_gemma2_bf16_matches_transformers_bf16(runs):
    """Both bf16 forwards round differently, op by op: ours must be as close to transformers' bf16
    logits as transformers' bf16 logits are to its fp32 ones (on soft-capped logits of |x| <= 3,
    a bf16 step is 1/64)."""
    _, batch, ours, theirs = runs
    real = batch["attention"].bool()
    mine, hf, fp32 = (
        r[real] for r in (ours["gemma2_bf16"]["logits"], theirs["gemma2_bf16"]["logits"], theirs["gemma2"]["logits"])
    )
    bf16_error = (hf - fp32).abs()
    assert bf16_error.max() > 1e-2  # both really ran in bf16
    assert (mine - hf).abs().mean() < bf16_error.mean()
    assert (mine - hf).abs().max() < 0.25
