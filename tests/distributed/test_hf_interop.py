"""Hugging Face interop: import, export, and parity with transformers on TP/PP layouts.

Two tiny random models are made with transformers (no downloads): a Llama with grouped-query
attention and untied embeddings, and a Qwen2 with a QKV bias and tied embeddings, both with a
vocabulary of 200 (padded to 256). Each spawn runs several checks, since a spawned process
costs seconds of imports:

- world 1: import both models, export them back (bit-exact), check TP=1/PP=1;
- world 2, TP=2: check both models, train the Llama a few steps and save;
- world 2, PP=2: start from the HF directory itself (ensure_megatron_checkpoint), check both;
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

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from simpo_megatron.model.hf import (  # noqa: E402
    HFConversionError,
    hf_config_to_overrides,
    model_config_dict,
    overrides_to_hf_config,
)
from simpo_megatron.model.hf_convert import main as convert_main  # noqa: E402
from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, MBS, MICRO_BATCHES = 200, 16, 2, 2
BETA, GAMMA_BETA_RATIO = 2.5, 0.3
ATOL = 1e-4


# ----------------------------------------------------------------------------- models and data


def make_hf_model(kind: str, path: Path) -> str:
    """Save a tiny random Llama (GQA, untied, with a tokenizer) or Qwen2 (QKV bias, tied)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0 if kind == "llama" else 1)
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, rope_theta=500000.0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    # Weights large enough for O(1) logits, norms away from 1 and biases away from 0, so
    # that a swapped or misplaced tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path)
    if kind == "llama":
        vocab = {f"t{i}": i for i in range(VOCAB)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return str(path)


def make_batches(seed: int) -> list[dict]:
    """Micro-batches of MBS pairs: chosen rows then rejected rows sharing each pair's prompt."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(MICRO_BATCHES):
        seqs = torch.randint(0, VOCAB, (2 * MBS, SEQ + 1), generator=g)
        prompt = torch.randint(3, 9, (MBS,), generator=g)
        mask = torch.zeros(2 * MBS, SEQ)
        for i in range(MBS):
            seqs[MBS + i, : prompt[i]] = seqs[i, : prompt[i]]
            mask[i, prompt[i] - 1:] = mask[MBS + i, prompt[i] - 1:] = 1  # labels are next tokens
        batches.append({
            "tokens": seqs[:, :-1].contiguous(),
            "labels": seqs[:, 1:].contiguous(),
            "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(2 * MBS, SEQ).contiguous(),
        })
    return batches


def hf_logits(hf_dir: str, batches: list[dict]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(b["tokens"]).logits for b in batches])


def reference(logits: torch.Tensor, batches: list[dict]) -> dict:
    """Sequence log-probs and SimPO metrics from full logits, by the spec's formulas."""
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    token_logps = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask).sum(-1) / mask.sum(-1)
    chosen = torch.cat([p[:MBS] for p in logps.split(2 * MBS)])
    rejected = torch.cat([p[MBS:] for p in logps.split(2 * MBS)])
    losses = -F.logsigmoid(BETA * ((chosen - rejected) - GAMMA_BETA_RATIO))
    return {
        "logits": logits,
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


def assert_matches(result: dict, ref: dict) -> None:
    torch.testing.assert_close(result["logits"][..., :VOCAB], ref["logits"], atol=ATOL, rtol=0)
    assert result["logits"][..., VOCAB:].abs().max() == 0  # padded rows are zeros
    torch.testing.assert_close(result["logps"].double(), ref["logps"], atol=ATOL, rtol=0)
    for name, value in ref["metrics"].items():
        assert result["metrics"][name] == pytest.approx(value, abs=ATOL), name


# ----------------------------------------------------------------------------- workers


def _config(hf_dir: str, tp: int, pp: int, save: str | None = None):
    from simpo_megatron.model.hf import hf_model_overrides

    return tiny_config(
        **hf_model_overrides(hf_dir, seq_length=SEQ), tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, seq_length=SEQ, micro_batch_size=MBS,
        global_batch_size=MBS * MICRO_BATCHES, beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO, save=save,
    )


def _forward(cfg, model, batches: list[dict]) -> dict | None:
    """Gathered logits and per-sequence log-probs through megatron's schedule (last stage, TP rank 0)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from simpo_megatron.logprobs import sequence_logps, vocab_parallel_token_logps

    def loss_func(labels, loss_mask, output):
        logps = sequence_logps(vocab_parallel_token_logps(output.clone(), labels, cfg.vocab_size), loss_mask)
        logits = gather_from_tensor_model_parallel_region(output)
        return torch.zeros(()), torch.tensor(1, dtype=torch.int), {"logits": logits, "logps": logps}

    def step(data_iterator, chunk):
        b = next(data_iterator)
        output = chunk(b["tokens"], b["position_ids"], attention_mask=None)
        return output, partial(loss_func, b["labels"], b["loss_mask"])

    for m in model:
        m.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=model[0],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=2 * MBS, forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage() or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return {key: torch.cat([o[key] for o in outputs]) for key in ("logits", "logps")}


def _check(cfg, load: str, batches: list[dict]):
    """Load ``load`` into a fresh model of ``cfg``; its outputs on ``batches`` (None off the last stage)."""
    from simpo_megatron.training.checkpointing import load_checkpoint
    from simpo_megatron.training.trainer import eval_step, setup_model_and_optimizer

    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    assert load_checkpoint(load, state) == 0
    result = _forward(cfg, state.model, batches)
    metrics = eval_step(cfg, state, batches)
    if result is not None:
        result["metrics"] = metrics
    return state, result


def _import_export_worker(hf_dirs: dict, out: str, batches: list[dict]) -> dict:
    from simpo_megatron.model.hf_convert import export_checkpoint, import_hf_checkpoint
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed

    initialize_distributed(ParallelLayout(1, 1))  # the conversions run in this world of one
    results = {}
    for name, hf_dir in hf_dirs.items():
        ckpt = import_hf_checkpoint(hf_dir, os.path.join(out, name), tensor_model_parallel_size=2)
        shard = "100KB" if name == "llama" else "5GB"  # Llama sharded with an index, Qwen2 one file
        export_checkpoint(ckpt, os.path.join(out, f"{name}_hf"), max_shard_size=shard)
        results[name] = _check(_config(hf_dir, 1, 1), ckpt, batches)[1]
    return results


def _layout_worker(tp: int, pp: int, sources: dict, batches: list[dict], save: str, train: bool) -> dict:
    from simpo_megatron.model.hf_convert import ensure_megatron_checkpoint
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import config_to_dict, save_checkpoint
    from simpo_megatron.training.trainer import train_step

    initialize_distributed(ParallelLayout(tp, pp))
    results = {}
    for name, (hf_dir, load) in sources.items():
        cfg = _config(hf_dir, tp, pp, save=os.path.join(save, name))
        ckpt = ensure_megatron_checkpoint(load, cfg)
        results[f"{name}/ckpt"] = ckpt
        if ckpt != load:  # converted from HF: a second call reuses the conversion
            stamp = os.stat(os.path.join(ckpt, "conversion.json")).st_mtime_ns
            assert ensure_megatron_checkpoint(load, cfg) == ckpt
            assert os.stat(os.path.join(ckpt, "conversion.json")).st_mtime_ns == stamp
        state, results[name] = _check(cfg, ckpt, batches)
        if train and name == "llama":
            for seed in range(3):
                assert not train_step(cfg, state, make_batches(100 + seed))["skipped"]
            save_checkpoint(cfg.save, state, config_dict=config_to_dict(cfg))
            results["trained"] = _forward(cfg, state.model, batches)
    return results


def _last_stage(results: list) -> dict:
    """The results of the rank that has them (last pipeline stage, TP rank 0)."""
    merged: dict = {}
    for r in results:
        merged.update({k: v for k, v in r.items() if v is not None})
    return merged


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(kind, root / kind) for kind in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    return make_batches(0)


@pytest.fixture(scope="module")
def references(hf_dirs, batches) -> dict[str, dict]:
    return {name: reference(hf_logits(d, batches), batches) for name, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def imported(hf_dirs, batches, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("imported"))
    return out, run_distributed(_import_export_worker, 1, hf_dirs, out, batches)[0]


@pytest.fixture(scope="module")
def tp2(hf_dirs, imported, batches, tmp_path_factory) -> tuple[str, dict]:
    out, _ = imported
    save = str(tmp_path_factory.mktemp("tp2"))
    sources = {name: (d, os.path.join(out, name)) for name, d in hf_dirs.items()}
    return save, _last_stage(run_distributed(_layout_worker, 2, 2, 1, sources, batches, save, True))


# ----------------------------------------------------------------------------- tests


def test_import_matches_transformers_tp1(imported, references):
    out, results = imported
    for name, ref in references.items():
        assert_matches(results[name], ref)
    assert sorted(os.listdir(out)) == ["llama", "llama_hf", "qwen2", "qwen2_hf"]  # no *.tmp left
    hf_config = os.listdir(os.path.join(out, "llama", "hf_config"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hf_config)


def test_export_after_import_is_exact(imported, hf_dirs):
    out, _ = imported
    for name, hf_dir in hf_dirs.items():
        exported = os.path.join(out, f"{name}_hf")
        original = load_file(os.path.join(hf_dir, "model.safetensors"))
        files = sorted(f for f in os.listdir(exported) if f.endswith(".safetensors"))
        tensors = {k: v for f in files for k, v in load_file(os.path.join(exported, f)).items()}
        assert tensors.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(tensors[key], value), key
        configs = [json.loads(Path(d, "config.json").read_text()) for d in (exported, hf_dir)]
        assert hf_config_to_overrides(configs[0]) == hf_config_to_overrides(configs[1])
    llama = os.listdir(os.path.join(out, "llama_hf"))
    assert len([f for f in llama if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in llama
    assert "tokenizer.json" in llama
    assert "lm_head.weight" not in load_file(os.path.join(out, "qwen2_hf", "model.safetensors"))  # tied


def test_tp2_matches_transformers(tp2, references):
    _, results = tp2
    for name, ref in references.items():
        assert_matches(results[name], ref)


def test_export_after_training_tp2(tp2, hf_dirs, references, batches, tmp_path):
    save, results = tp2
    trained = results["trained"]
    assert not torch.allclose(trained["logits"][..., :VOCAB], references["llama"]["logits"], atol=1e-2)
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf_checkpoint.py"), "export",
         "--load", os.path.join(save, "llama"), "--output", str(out), "--hf-config", hf_dirs["llama"]],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert_matches({**trained, "metrics": {}}, {**reference(hf_logits(str(out), batches), batches), "metrics": {}})
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("t7") == 7


def test_pp2_from_hf_directory(hf_dirs, imported, references, batches, tmp_path):
    out, _ = imported
    sources = {"llama": (hf_dirs["llama"], os.path.join(out, "llama")), "qwen2": (hf_dirs["qwen2"], hf_dirs["qwen2"])}
    results = _last_stage(run_distributed(_layout_worker, 2, 1, 2, sources, batches, str(tmp_path), False))
    assert results["llama/ckpt"] == os.path.join(out, "llama")  # a Megatron checkpoint passes through
    assert results["qwen2/ckpt"] == os.path.join(str(tmp_path), "qwen2", "hf_import")
    for name, ref in references.items():
        assert_matches(results[name], ref)


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


def test_config_mapping():
    llama = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    overrides = hf_config_to_overrides(llama)
    assert overrides["use_rope_scaling"] and overrides["rope_scaling_factor"] == 32.0
    assert overrides["rotary_base"] == 500000 and overrides["num_query_groups"] == 2
    cfg = tiny_config(**overrides)
    assert hf_config_to_overrides(overrides_to_hf_config(cfg)) == overrides
    assert model_config_dict(cfg)["kv_channels"] == 16
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
    mistral = {**llama, "model_type": "mistral", "rope_scaling": None, "sliding_window": 4096}
    assert "sliding_window=4096" in error(mistral, seq_length=8192)
    assert hf_config_to_overrides(mistral, seq_length=4096)["add_qkv_bias"] is False
    assert hf_config_to_overrides({**mistral, "model_type": "qwen2", "use_sliding_window": False},
                                  seq_length=8192)["add_qkv_bias"]
