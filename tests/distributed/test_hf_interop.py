"""Hugging Face interop: import, export, and parity with transformers on TP/PP/VPP layouts.

Tiny random models are made with transformers' own classes (no downloads), one per family
the recipes train, each with a vocabulary of 200 (padded to 256):

- llama: grouped-query attention, untied embeddings, a tokenizer;
- llama32: Llama-3.2's RoPE scaling (``rope_type: llama3``, factor 32) and tied embeddings;
- mistral: a sliding window longer than the test sequences;
- qwen2_tied / qwen2_untied: a QKV bias, with and without tied embeddings (Qwen2.5 small / large);
- gemma2 (eager attention, 4 layers): soft-capped attention and output logits, a sliding window
  of 4 tokens on alternating layers (shorter than the 16-token sequences), query_pre_attn_scalar
  != head_dim, sandwich norms, (1 + w) norms, GeGLU, scaled and tied embeddings. The reference
  test checks that dropping any of these changes transformers' logits, so each is tested.

Each spawn runs several checks, since a spawned process costs seconds of imports:

- world 1: import every model, export it back (bit-exact), check TP=1/PP=1 from the import,
  one Gemma-2 optimizer step;
- world 2, TP=2: every model loaded straight from its HF directory (the llama from its
  TP=1 import), checked; the same Gemma-2 step; the llama trained a few steps and saved;
- world 2, PP=2: every model checked, saved, and exported back from the PP checkpoint;
- world 2, PP=2 x VPP=2: Gemma-2 checked, saved, and exported back from the VPP checkpoint;
- the CLI exports the TP=2 training checkpoint; transformers reproduces its logits.

A check compares the (gathered) logits and per-sequence log-probs with transformers' forward
in fp32, and the SimPO metrics of ``eval_step`` with the formulas computed from those logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from simpo_megatron.data.batch import MicroBatch
from simpo_megatron.hf import HFConversionError
from simpo_megatron.hf.config_mapping import (
    hf_config_to_overrides,
    model_config_dict,
    model_config_from_dict,
    to_hf_config,
)
from simpo_megatron.hf.tensor_mapping import hf_to_megatron, megatron_to_hf
from simpo_megatron.testing import run_distributed, tiny_config
from simpo_megatron.training.hf_checkpoint import main as convert_main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, MBS, MICRO_BATCHES = 200, 16, 2, 2
BETA, GAMMA_BETA_RATIO = 2.5, 0.3
ATOL = 1e-4
MODELS = ("llama", "llama32", "mistral", "qwen2_tied", "qwen2_untied", "gemma2")
GEMMA2 = dict(
    head_dim=16,
    query_pre_attn_scalar=32,
    sliding_window=4,
    attn_logit_softcapping=4.0,
    final_logit_softcapping=3.0,
)
# The Gemma-2 step compares updates: SGD's is -lr x the clipped gradient. (Adam's first step is
# about lr x sign(gradient), which rounding flips where a gradient is near 0.)
GEMMA2_STEP = dict(optimizer="sgd", lr=0.1)
LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


# ----------------------------------------------------------------------------- models and data


def hf_model(kind: str, **changes):
    """The tiny transformers model of ``kind`` (random weights; ``changes`` edit its config)."""
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**shape, rope_theta=500000.0)
    elif kind == "llama32":
        config = transformers.LlamaConfig(
            **{**shape, "max_position_embeddings": 131072}, rope_parameters=LLAMA32_ROPE, tie_word_embeddings=True
        )
    elif kind == "mistral":
        config = transformers.MistralConfig(**shape, sliding_window=2 * SEQ)
    elif kind.startswith("qwen2"):
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=kind == "qwen2_tied")
    else:
        config = transformers.Gemma2Config(**{**shape, "num_hidden_layers": 4}, **GEMMA2, attn_implementation="eager")
    for key, value in changes.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_hf_model(kind: str, path: Path) -> str:
    """Save the tiny model of ``kind`` (the llama with a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(MODELS.index(kind))
    model = hf_model(kind)
    # Weights large enough for O(1) logits (Gemma-2: for scores the soft-caps bend), norms
    # away from their identity (Gemma's 1 + w norms: w around 0) and biases away from 0, so
    # that a swapped or misplaced tensor shows.
    gemma = kind == "gemma2"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.3 if gemma else 0.1)
    model.save_pretrained(path)
    if kind == "llama":
        vocab = {f"t{i}": i for i in range(VOCAB)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return str(path)


def make_batches(seed: int) -> list[MicroBatch]:
    """Micro-batches of MBS pairs: chosen rows then rejected rows sharing each pair's prompt."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(MICRO_BATCHES):
        seqs = torch.randint(0, VOCAB, (2 * MBS, SEQ + 1), generator=g)
        prompt = torch.randint(3, 9, (MBS,), generator=g)
        mask = torch.zeros(2 * MBS, SEQ)
        for i in range(MBS):
            seqs[MBS + i, : prompt[i]] = seqs[i, : prompt[i]]
            mask[i, prompt[i] - 1 :] = mask[MBS + i, prompt[i] - 1 :] = 1  # labels are next tokens
        batches.append(
            MicroBatch(
                tokens=seqs[:, :-1].contiguous(),
                labels=seqs[:, 1:].contiguous(),
                loss_mask=mask,
                position_ids=torch.arange(SEQ).expand(2 * MBS, SEQ).contiguous(),
                num_pairs=MBS,
                num_tokens=2 * MBS * SEQ,
            )
        )
    return batches


def logits_of(model, batches: list[MicroBatch]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b.tokens).logits for b in batches])


def hf_logits(hf_dir: str, batches: list[MicroBatch]) -> torch.Tensor:
    return logits_of(transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), batches)


def reference(logits: torch.Tensor, batches: list[MicroBatch]) -> dict:
    """Sequence log-probs (averaged over response tokens) and SimPO's metrics from full logits,
    computed directly in float64."""
    labels = torch.cat([b.labels for b in batches])
    mask = torch.cat([b.loss_mask for b in batches])
    token_logps = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask).sum(-1) / mask.sum(-1)
    chosen = torch.cat([p[:MBS] for p in logps.split(2 * MBS)])
    rejected = torch.cat([p[MBS:] for p in logps.split(2 * MBS)])
    losses = -F.logsigmoid(BETA * ((chosen - rejected) - GAMMA_BETA_RATIO))
    return {
        "logits": logits,
        "token_logps": token_logps,
        "logps": logps,
        "metrics": {
            "loss": losses.mean().item(),
            "rewards/chosen": (BETA * chosen).mean().item(),
            "rewards/rejected": (BETA * rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).double().mean().item(),
            "rewards/margins": (BETA * (chosen - rejected)).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item(),
        },
    }


def assert_matches(result: dict, ref: dict, name: str = "") -> None:
    torch.testing.assert_close(result["logits"][..., :VOCAB], ref["logits"], atol=ATOL, rtol=0, msg=name)
    assert result["logits"][..., VOCAB:].abs().max() == 0, name  # padded rows are zeros
    torch.testing.assert_close(result["token_logps"].double(), ref["token_logps"], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(result["logps"].double(), ref["logps"], atol=ATOL, rtol=0, msg=name)
    for metric, value in ref["metrics"].items():
        assert result["metrics"][metric] == pytest.approx(value, abs=ATOL), (name, metric)


def hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    return {k: v for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}


def assert_same_tensors(exported: str, hf_dir: str) -> None:
    tensors, original = hf_tensors(exported), hf_tensors(hf_dir)
    assert tensors.keys() == original.keys(), exported
    for key, value in original.items():
        assert torch.equal(tensors[key], value), (exported, key)
    configs = [json.loads(Path(d, "config.json").read_text()) for d in (exported, hf_dir)]
    assert hf_config_to_overrides(configs[0]) == hf_config_to_overrides(configs[1]), exported


# ----------------------------------------------------------------------------- workers


def _config(hf_dir: str, tp: int, pp: int, save: str | None = None, **extra):
    from simpo_megatron.hf import hf_model_overrides

    return tiny_config(
        **hf_model_overrides(hf_dir, seq_length=SEQ),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        seq_length=SEQ,
        micro_batch_size=MBS,
        global_batch_size=MBS * MICRO_BATCHES,
        beta=BETA,
        gamma_beta_ratio=GAMMA_BETA_RATIO,
        save=save,
        adam_beta2=0.999,
        **extra,
    )


def _forward(cfg, model, batches: list[MicroBatch]) -> dict | None:
    """Gathered logits, per-token and per-sequence log-probs through megatron's schedule
    (on the last stage's TP rank 0; None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from simpo_megatron.logprobs import sequence_logps, vocab_parallel_token_logps

    def loss_func(labels, loss_mask, output):
        token_logps = vocab_parallel_token_logps(output.clone(), labels, cfg.model.vocab_size)
        logits = gather_from_tensor_model_parallel_region(output)
        out = {"logits": logits, "token_logps": token_logps, "logps": sequence_logps(token_logps, loss_mask)}
        return torch.zeros(()), torch.tensor(1, dtype=torch.int), out

    def step(data_iterator, chunk):
        b = next(data_iterator)
        output = chunk(b.tokens, b.position_ids, attention_mask=None)
        return output, partial(loss_func, b.labels, b.loss_mask)

    for m in model:
        m.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=2 * MBS,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage() or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return {key: torch.cat([o[key] for o in outputs]) for key in ("logits", "token_logps", "logps")}


def _check(cfg, load: str, batches: list[MicroBatch]):
    """A fresh model of ``cfg`` with the weights of ``load`` (an HF directory or a Megatron
    checkpoint); its outputs on ``batches`` (None off the last stage)."""
    from simpo_megatron.hf import is_hf_checkpoint, load_hf_weights
    from simpo_megatron.training.checkpointing import load_checkpoint
    from simpo_megatron.training.trainer import eval_step, setup_model_and_optimizer

    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    if is_hf_checkpoint(load):
        load_hf_weights(load, state.model, cfg)
        state.optimizer.reload_model_params()
    else:
        assert load_checkpoint(load, state) == 0
    result = _forward(cfg, state.model, batches)
    metrics = eval_step(cfg, state, batches)
    if result is not None:
        result["metrics"] = metrics
    return state, result


def _gemma2_step(cfg, state, batches: list[MicroBatch], save: str) -> float | None:
    """One optimizer step; the checkpoint of its result under ``save``; the step's loss."""
    from simpo_megatron.training.checkpointing import config_to_dict, save_checkpoint
    from simpo_megatron.training.trainer import train_step

    step = train_step(cfg, state, batches)
    assert not step["skipped"]
    save_checkpoint(save, state, config_dict=config_to_dict(cfg))
    return None if step["metrics"] is None else step["metrics"]["loss"]


def _world1_worker(hf_dirs: dict, out: str, batches: list[MicroBatch]) -> dict:
    from megatron.core.utils import unwrap_model

    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.hf_checkpoint import export_checkpoint, import_hf_checkpoint

    initialize_distributed(ParallelLayout(1, 1))  # the conversions run in this world of one
    results = {}
    for name, hf_dir in hf_dirs.items():
        ckpt = import_hf_checkpoint(hf_dir, os.path.join(out, name), tensor_model_parallel_size=2)
        shard = "100KB" if name == "llama" else "5GB"  # Llama sharded with an index, the others one file
        export_checkpoint(ckpt, os.path.join(out, f"{name}_hf"), max_shard_size=shard)
        cfg = _config(hf_dir, 1, 1, **(GEMMA2_STEP if name == "gemma2" else {}))
        state, results[name] = _check(cfg, ckpt, batches)
        if name == "llama32":
            results["llama32/inv_freq"] = unwrap_model(state.model[0]).rotary_pos_emb.inv_freq.clone()
        if name == "gemma2":
            results["gemma2/step_loss"] = _gemma2_step(cfg, state, batches, os.path.join(out, "gemma2_step"))
    return _by_value(results)


def _layout_worker(tp: int, pp: int, vpp: int | None, sources: dict, batches: list[MicroBatch], save: str) -> dict:
    """Check every model of ``sources`` (name -> (hf_dir, what to load)) on a TP x PP (x VPP) world
    and save it under ``save/name``: untouched, the Gemma-2 one step on, the llama trained
    three steps (TP=2 only)."""
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import config_to_dict, save_checkpoint
    from simpo_megatron.training.trainer import train_step

    initialize_distributed(ParallelLayout(tp, pp, vpp))
    results = {}
    for name, (hf_dir, load) in sources.items():
        extra = {"num_layers_per_virtual_pipeline_stage": 1} if vpp else {}
        if name == "gemma2":
            extra.update(GEMMA2_STEP)
        cfg = _config(hf_dir, tp, pp, save=os.path.join(save, name), **extra)
        state, results[name] = _check(cfg, load, batches)
        if tp == 2 and name == "gemma2":
            results["gemma2/step_loss"] = _gemma2_step(cfg, state, batches, cfg.checkpoint.save)
        elif tp == 2 and name == "llama":
            for seed in range(3):
                assert not train_step(cfg, state, make_batches(100 + seed))["skipped"]
            save_checkpoint(cfg.checkpoint.save, state, config_dict=config_to_dict(cfg))
            results["trained"] = _forward(cfg, state.model, batches)
        elif tp == 1:
            save_checkpoint(cfg.checkpoint.save, state, config_dict=config_to_dict(cfg))
    return _by_value(results)


def _by_value(value):
    """``value`` with its tensors as numpy arrays (``to_torch`` undoes it): a worker's result
    travels by value, not as shared memory that its exit may take away first."""
    if isinstance(value, dict):
        return {k: _by_value(v) for k, v in value.items()}
    return value.detach().numpy() if isinstance(value, torch.Tensor) else value


def _to_torch(value):
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _last_stage(results: list) -> dict:
    """The results of the ranks that have them (last pipeline stage, TP rank 0)."""
    merged: dict = {}
    for r in results:
        merged.update({k: v for k, v in _to_torch(r).items() if v is not None})
    return merged


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(kind, root / kind) for kind in MODELS}


@pytest.fixture(scope="module")
def batches() -> list[MicroBatch]:
    return make_batches(0)


@pytest.fixture(scope="module")
def references(hf_dirs, batches) -> dict[str, dict]:
    return {name: reference(hf_logits(d, batches), batches) for name, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def imported(hf_dirs, batches, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("imported"))
    return out, _last_stage(run_distributed(_world1_worker, 1, hf_dirs, out, batches))


@pytest.fixture(scope="module")
def tp2(hf_dirs, imported, batches, tmp_path_factory) -> tuple[str, dict]:
    out, _ = imported
    save = str(tmp_path_factory.mktemp("tp2"))
    sources = {name: (d, os.path.join(out, name) if name == "llama" else d) for name, d in hf_dirs.items()}
    return save, _last_stage(run_distributed(_layout_worker, 2, 2, 1, None, sources, batches, save))


@pytest.fixture(scope="module")
def pp2(hf_dirs, imported, batches, tmp_path_factory) -> tuple[str, dict]:
    out, _ = imported
    save = str(tmp_path_factory.mktemp("pp2"))
    sources = {name: (d, os.path.join(out, name) if name == "qwen2_tied" else d) for name, d in hf_dirs.items()}
    return save, _last_stage(run_distributed(_layout_worker, 2, 1, 2, None, sources, batches, save))


# ----------------------------------------------------------------------------- tests


def test_the_test_models_use_every_gemma2_feature(hf_dirs, references, batches):
    """Dropping any Gemma-2 feature changes transformers' own logits on these weights and
    sequences, so matching them tests each feature."""
    weights = hf_tensors(hf_dirs["gemma2"])
    for change in (
        dict(attn_logit_softcapping=None),
        dict(final_logit_softcapping=None),
        dict(sliding_window=10 * SEQ),
        dict(query_pre_attn_scalar=GEMMA2["head_dim"]),
    ):
        model = hf_model("gemma2", **change)
        model.load_state_dict(weights, strict=False)
        model.tie_weights()
        changed = logits_of(model, batches)
        assert (changed - references["gemma2"]["logits"]).abs().max() > 1e-2, change


def test_import_matches_transformers_tp1(imported, references):
    out, results = imported
    for name, ref in references.items():
        assert_matches(results[name], ref, name)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    hf_config = os.listdir(os.path.join(out, "llama", "hf_config"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hf_config)


def test_llama32_rope_scaling_factor_32(imported, hf_dirs):
    """megatron's llama3 RoPE frequencies are transformers' for factor 32 (not the default 8)."""
    _, results = imported
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama32"])
    torch.testing.assert_close(results["llama32/inv_freq"], hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    factor8 = hf_model("llama32", rope_parameters={**LLAMA32_ROPE, "factor": 8.0}).model.rotary_emb.inv_freq
    assert not torch.allclose(factor8, hf.model.rotary_emb.inv_freq)


def test_export_after_import_is_exact(imported, hf_dirs):
    out, _ = imported
    for name, hf_dir in hf_dirs.items():
        assert_same_tensors(os.path.join(out, f"{name}_hf"), hf_dir)
    llama = os.listdir(os.path.join(out, "llama_hf"))
    assert len([f for f in llama if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in llama
    assert "tokenizer.json" in llama
    for tied in ("qwen2_tied", "llama32", "gemma2"):
        assert "lm_head.weight" not in hf_tensors(os.path.join(out, f"{tied}_hf")), tied
    assert "lm_head.weight" in hf_tensors(os.path.join(out, "qwen2_untied_hf"))


def test_tp2_matches_transformers(tp2, references):
    _, results = tp2
    for name, ref in references.items():
        assert_matches(results[name], ref, name)


def test_gemma2_step_is_the_same_on_tp1_and_tp2(imported, tp2):
    from simpo_megatron.checkpoint_format import resolve_checkpoint
    from simpo_megatron.hf.sharded import read_checkpoint_tensors

    out, tp1_results = imported
    save, tp2_results = tp2
    assert tp2_results["gemma2/step_loss"] == pytest.approx(tp1_results["gemma2/step_loss"], abs=1e-6)
    before = read_checkpoint_tensors(resolve_checkpoint(os.path.join(out, "gemma2")))
    after = [
        read_checkpoint_tensors(resolve_checkpoint(p))
        for p in (os.path.join(out, "gemma2_step"), os.path.join(save, "gemma2"))
    ]
    weights = [k for k, v in before.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")]
    assert "decoder.layers.mlp.linear_fc2.post_layernorm.weight" in weights
    for key in weights:
        value = before[key]
        update1, update2 = after[0][key] - value, after[1][key] - value
        assert update1.abs().max() > 0, key
        # Updates of ~1e-3 on weights of ~1, whose fp32 rounding is ~6e-8.
        torch.testing.assert_close(update2, update1, atol=5e-7, rtol=0, msg=key)


def test_export_after_training_tp2(tp2, hf_dirs, references, batches, tmp_path):
    save, results = tp2
    trained = results["trained"]
    assert not torch.allclose(trained["logits"][..., :VOCAB], references["llama"]["logits"], atol=1e-2)
    out = tmp_path / "exported"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_hf_checkpoint.py"),
            "export",
            "--load",
            os.path.join(save, "llama"),
            "--output",
            str(out),
            "--hf-config",
            hf_dirs["llama"],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert_matches({**trained, "metrics": {}}, {**reference(hf_logits(str(out), batches), batches), "metrics": {}})
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("t7") == 7


def test_pp2_matches_transformers_and_exports_exactly(pp2, hf_dirs, references, tmp_path):
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    save, results = pp2
    for name, ref in references.items():
        assert_matches(results[name], ref, name)
        exported = export_checkpoint(os.path.join(save, name), str(tmp_path / name), hf_config_dir=hf_dirs[name])
        assert_same_tensors(exported, hf_dirs[name])


def test_vpp_gemma2_matches_transformers_and_exports_exactly(hf_dirs, references, batches, tmp_path):
    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    sources = {"gemma2": (hf_dirs["gemma2"], hf_dirs["gemma2"])}
    save = str(tmp_path / "vpp")
    results = _last_stage(run_distributed(_layout_worker, 2, 1, 2, 2, sources, batches, save))
    assert_matches(results["gemma2"], references["gemma2"], "gemma2")
    exported = export_checkpoint(os.path.join(save, "gemma2"), str(tmp_path / "out"), hf_config_dir=hf_dirs["gemma2"])
    assert_same_tensors(exported, hf_dirs["gemma2"])


def _resume_worker(hf_dir: str, save: str) -> list[MicroBatch]:
    """Two runs with ``--load HF_DIR --save SAVE``: 2 iterations, then up to 3."""
    from simpo_megatron.runtime import destroy_distributed
    from simpo_megatron.training.loop import pretrain

    summaries = []
    for iters in (2, 3):
        cfg = tiny_config(
            load=hf_dir,
            save=save,
            train_iters=iters,
            seq_length=SEQ,
            log_interval=1,
            micro_batch_size=MBS,
            global_batch_size=MBS,
        )
        summaries.append(pretrain(cfg))
        destroy_distributed()
    return summaries


def test_run_from_hf_directory_resumes_from_save(hf_dirs, tmp_path):
    """--load HF_DIR starts from the HF weights; the same command again continues from --save
    (iteration 3 follows 2) instead of starting over from the HF model."""
    save = tmp_path / "run"
    run_distributed(_resume_worker, 1, hf_dirs["gemma2"], str(save))
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert (save / "hf_config" / "config.json").is_file()
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000002", "iter_0000003"]


# ----------------------------------------------------------------------------- errors and config mapping


def _assert_nothing_written(output: Path) -> None:
    assert not output.exists() and not Path(str(output) + ".tmp").exists()


def test_unsupported_architecture_writes_nothing(tmp_path, capsys):
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"wte.weight": torch.zeros(4, 4)}, str(hf_dir / "model.safetensors"))
    output = tmp_path / "out"
    assert convert_main(["import", "--hf-dir", str(hf_dir), "--output", str(output)]) == 1
    assert "model_type 'gpt2'" in capsys.readouterr().err
    _assert_nothing_written(output)


def test_wrong_tensor_shape_writes_nothing(hf_dirs, tmp_path, capsys):
    hf_dir = tmp_path / "broken"
    hf_dir.mkdir()
    for f in os.listdir(hf_dirs["llama"]):
        if f != "model.safetensors":
            (hf_dir / f).write_bytes(Path(hf_dirs["llama"], f).read_bytes())
    tensors = load_file(os.path.join(hf_dirs["llama"], "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    output = tmp_path / "out"
    assert convert_main(["import", "--hf-dir", str(hf_dir), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.weight" in err and "(48, 64)" in err
    _assert_nothing_written(output)


def test_tensor_mapping_round_trip_and_megatron_layout(hf_dirs):
    """HF -> Megatron -> HF is the identity; the Megatron side has megatron-core's fused layouts."""
    for name in ("qwen2_tied", "gemma2"):
        hf = hf_tensors(hf_dirs[name])
        cfg = tiny_config(**hf_config_to_overrides(json.loads(Path(hf_dirs[name], "config.json").read_text())))
        mcore = hf_to_megatron(hf, cfg.model, 256)
        back = megatron_to_hf(mcore, cfg.model)
        assert back.keys() == hf.keys() - {"lm_head.weight"}
        for key, value in back.items():
            assert torch.equal(value, hf[key]), (name, key)
    # Layer 1's QKV: per query group, its 2 query heads, then its key and value head (head dim 16).
    qkv = mcore["decoder.layers.self_attention.linear_qkv.weight"][1]
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(qkv[64:96], q[32:64]) and torch.equal(qkv[96:112], k[16:32])
    fc1 = mcore["decoder.layers.mlp.linear_fc1.weight"][1]
    assert torch.equal(fc1[128:], hf["model.layers.1.mlp.up_proj.weight"])
    assert mcore["embedding.word_embeddings.weight"][VOCAB:].abs().max() == 0


def test_config_mapping():
    llama = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 200,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    overrides = hf_config_to_overrides(llama)
    assert overrides["use_rope_scaling"] and overrides["rope_scaling_factor"] == 32.0
    assert overrides["rotary_base"] == 500000 and overrides["num_query_groups"] == 2
    cfg = tiny_config(**overrides)
    assert hf_config_to_overrides(to_hf_config(cfg)) == overrides
    assert model_config_dict(cfg.model)["kv_channels"] == 16
    assert model_config_from_dict(cfg.to_flat()) == cfg.model  # the checkpoint's record, and back
    # transformers 5 keeps theta and scaling in rope_parameters.
    v5 = {k: v for k, v in llama.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**llama["rope_scaling"], "rope_theta": 500000.0}
    assert hf_config_to_overrides(v5) == overrides

    def error(config: dict, **kwargs) -> str:
        with pytest.raises(HFConversionError) as e:
            hf_config_to_overrides(config, **kwargs)
        return str(e.value)

    assert "'yarn'" in error({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert "high_freq_factor" in error({**llama, "rope_scaling": {**llama["rope_scaling"], "high_freq_factor": 8.0}})
    assert "attention_bias" in error({**llama, "attention_bias": True})
    assert "hidden_act" in error({**llama, "hidden_act": "gelu"})
    # Mistral: no window, or a window on every layer (exact at any length).
    mistral = {**llama, "model_type": "mistral", "rope_scaling": None, "sliding_window": None}
    assert hf_config_to_overrides(mistral, seq_length=8192)["sliding_window"] is None
    windowed = hf_config_to_overrides({**mistral, "sliding_window": 4096}, seq_length=8192)
    assert (windowed["sliding_window"], windowed["window_attn_skip_freq"]) == (4096, None)
    assert hf_config_to_overrides(windowed_cfg := to_hf_config(tiny_config(**windowed)))["sliding_window"] == 4096
    assert windowed_cfg["model_type"] == "mistral"
    # Qwen2: a window on the top layers only is exact while it covers the sequence.
    qwen2 = {
        **mistral,
        "model_type": "qwen2",
        "sliding_window": 4096,
        "layer_types": ["full_attention", "sliding_attention"],
    }
    assert hf_config_to_overrides(qwen2, seq_length=4096)["sliding_window"] is None
    assert "sliding_window=4096" in error(qwen2, seq_length=8192)
    assert hf_config_to_overrides({**qwen2, "layer_types": None, "use_sliding_window": False}, seq_length=8192)[
        "add_qkv_bias"
    ]
    # Gemma-2: every field, and back.
    gemma2 = {
        "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 200,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": 8,
        "max_position_embeddings": 8192,
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    }
    g = hf_config_to_overrides(gemma2)
    assert (g["sliding_window"], g["window_attn_skip_freq"], g["softmax_scale"]) == (8, 2, 32**-0.5)
    assert g["geglu"] and not g["swiglu"] and g["apply_layernorm_1p"] and g["sandwich_norm"] and g["scale_embeddings"]
    assert not g["untie_embeddings_and_output_weights"]  # Gemma-2 ties by default
    back = to_hf_config(tiny_config(**g))
    assert back["query_pre_attn_scalar"] == 32 and back["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert hf_config_to_overrides(back) == g
    assert "hidden_activation" in error({**gemma2, "hidden_activation": "gelu"})
