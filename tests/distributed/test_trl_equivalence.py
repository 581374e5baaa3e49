"""Training equals TRL's CPOTrainer(loss_type="simpo"), step for step, from the same HF weights.

One tiny random Llama (transformers' own classes, no download) and a word-level tokenizer are
saved to a directory; a handful of plain-text pairs of different lengths (so padding and the
masks matter) are preprocessed by our tool. Our trainer runs from ``--load HF_DIR`` on several
layouts; TRL's CPOTrainer runs once, on one process, from the same directory, on the same
pairs in the same order. Compared per step: the loss, the SFT term (TRL's ``nll_loss``), the
reward metrics as TRL logs them (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/*``), the gradient norm before clipping and the learning rate;
after the last step, every weight (ours exported back to HF names). Our layouts: one process
(2 micro-batches, padded; and with ``--packing``), and on two gloo processes DP=2 with the
distributed optimizer (1 pair per micro-batch, 2 per rank), TP=2, and PP=2 (4 micro-batches
through the 1F1B schedule), each against the one TRL run.

The two objectives are set to be the same one:
- SimPO with average log-probs (TRL's simpo always averages), beta 2.5, gamma/beta 0.4 (TRL's
  ``simpo_gamma`` is the absolute gamma, 1.0), label smoothing 0.1 in both;
- the SFT term: TRL's ``cpo_alpha`` x ``nn.CrossEntropyLoss`` over the chosen tokens of its
  batch, our ``--sft-weight`` with the token-level form (the default), over the global batch.
  TRL takes that mean per micro-batch and averages the micro-batches under gradient
  accumulation, so TRL runs the global batch as one micro-batch (the SFT term is then the same
  function of the same tokens); our layouts split it into micro-batches and DP ranks, which must
  not change it;
- AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.1 on everything but norms and
  biases, as both trainers exclude them), grad-norm clipping at CLIP, linear decay with WARMUP
  warmup steps, no dropout, fp32.
The pairs are consumed in our sampler's order; TRL reads that order sequentially.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 200, 32
BETA, GAMMA_BETA_RATIO, LABEL_SMOOTHING, SFT_WEIGHT = 2.5, 0.4, 0.1, 0.5
LR, WARMUP, WEIGHT_DECAY, CLIP, ADAM_EPS = 3e-3, 2, 0.1, 2.0, 1e-8
GLOBAL_BATCH, STEPS, SEED = 4, 8, 1234
# name -> (TP, PP, micro-batch size, distributed optimizer[, other flags]); DP = world / (TP x PP).
LAYOUTS = {
    1: {"tp1_2mb": (1, 1, 2, False), "tp1_packed": (1, 1, 2, False, {"packing": True})},
    2: {"dp2_distopt": (1, 1, 1, True), "tp2": (2, 1, 2, False), "pp2_4mb": (1, 2, 1, False)},
}
# fp32 throughout. Measured max differences over the 8 steps and 5 layouts: 3.9e-6 (grad norm,
# values 1.5-23), 2.9e-6 (rewards and margins, |rewards| up to 11), 9.5e-7 (loss, SFT term,
# log-probs); exact accuracies. That is a few roundings at fp32's spacing for these magnitudes
# (1e-6 to 2e-6 between 8 and 32). Real differences are orders larger: TRL with the SFT mean
# taken per micro-batch (gradient accumulation 2) is off by 0.05 in the loss, without label
# smoothing by 0.66.
METRIC_ATOL = 1e-5
# Measured max weight difference after 8 steps: 4.6e-7 on weights of magnitude <= 1.3 (a few
# fp32 roundings); each tensor moved by >= 1.1e-2 in training; the two TRL variants above end
# 6e-3 and 1.6e-2 away.
WEIGHT_ATOL = 2e-6
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# TRL's side of the run settings both equivalence tests share: one global batch a step, read in
# our sampler's order, the optimizer and schedule of _config, fp32 on the CPU, no dropout.
TRL_TRAINING_ARGS = dict(
    max_length=SEQ,
    per_device_train_batch_size=GLOBAL_BATCH,
    gradient_accumulation_steps=1,
    max_steps=STEPS,
    learning_rate=LR,
    lr_scheduler_type="linear",
    warmup_steps=WARMUP,
    weight_decay=WEIGHT_DECAY,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=ADAM_EPS,
    max_grad_norm=CLIP,
    optim="adamw_torch",
    train_sampling_strategy="sequential",
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    fp16=False,
    dataloader_num_workers=0,
    disable_dropout=True,
    seed=0,
)


def _trl():
    """TRL's CPOConfig and CPOTrainer; without TRL (or transformers) the tests fail, never skip."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO lives in trl.experimental in TRL 1.x
    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError as e:
        pytest.fail(
            f"TRL is needed for the equivalence with CPOTrainer ({e}); install the test extras: "
            "pip install -e '.[test]'"
        )
    return CPOConfig, CPOTrainer


# ----------------------------------------------------------------------------- model and data


def make_hf_dir(path: Path) -> str:
    """A tiny random Llama and a word-level tokenizer: <pad>, <s>, </s> are tokens 0-2, word wI is
    token I (special tokens have names no word contains: the tokenizer finds them inside words)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # O(1) logits, norms away from the identity
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(path)
    return str(path)


def make_pairs() -> list[dict]:
    """Eight plain-text pairs; prompts of 2-8 words, responses of 1-10 (all fit SEQ with BOS/EOS)."""
    g = torch.Generator().manual_seed(3)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n,), generator=g).tolist())

    lengths = [(2, 1, 9), (8, 10, 3), (5, 4, 4), (3, 7, 1), (6, 2, 10), (4, 9, 6), (7, 3, 2), (2, 6, 8)]
    return [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in lengths]


def preprocess(pairs: list[dict], hf_dir: str, root: Path) -> str:
    from simpo_megatron.data import preprocess as tool

    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prefix = str(root / "pairs")
    argv = [
        "--input",
        str(path),
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        hf_dir,
    ]
    assert tool.main(argv) == 0
    return prefix


# ----------------------------------------------------------------------------- our trainer


def _config(hf_dir: str, prefix: str, save: str, tp: int, pp: int, mbs: int, distopt: bool, extra=None):
    return tiny_config(
        **{
            **dict(
                load=hf_dir,
                save=save,
                data_path=[prefix],
                split="100,0,0",
                mock_data=False,
                tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=hf_dir,
                seq_length=SEQ,
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                use_distributed_optimizer=distopt,
                micro_batch_size=mbs,
                global_batch_size=GLOBAL_BATCH,
                train_iters=STEPS,
                log_interval=1,
                lr=LR,
                min_lr=0.0,
                lr_decay_style="linear",
                lr_warmup_iters=WARMUP,
                weight_decay=WEIGHT_DECAY,
                adam_beta1=0.9,
                adam_beta2=0.999,
                adam_eps=ADAM_EPS,
                clip_grad=CLIP,
                seed=SEED,
                beta=BETA,
                gamma_beta_ratio=GAMMA_BETA_RATIO,
                label_smoothing=LABEL_SMOOTHING,
                sft_weight=SFT_WEIGHT,
                sft_loss_form="token",
                average_log_prob=True,
                hidden_dropout=0.0,
                attention_dropout=0.0,
            ),
            **(extra or {}),
        }
    )


def _stream(cfg) -> list[list[dict]]:
    """The pairs of each step as our trainer's sampler draws them (stored token ids)."""
    from simpo_megatron.data.provider import build_datasets
    from simpo_megatron.data.sampler import PairBatchSampler

    data = build_datasets(cfg)
    sampler = PairBatchSampler(
        len(data.train), 0, GLOBAL_BATCH, GLOBAL_BATCH, 0, 1, shuffle=True, seed=cfg.optimizer.seed
    )
    steps = []
    for _, indices in zip(range(STEPS), sampler):
        steps.append([{"index": int(i), **{k: v.tolist() for k, v in data.train[i].items()}} for i in indices])
    return steps


def _train_worker(layouts: dict, hf_dir: str, prefix: str, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    out = {}
    for name, layout in layouts.items():
        cfg = _config(hf_dir, prefix, os.path.join(root, name), *layout)
        if name == "tp1_2mb":
            out["stream"] = _stream(cfg)
        pretrain(cfg)
        parallel_state.destroy_model_parallel()
    return out


def _our_metrics(save: Path) -> list[dict]:
    """Each iteration's train record, with the packing efficiency of the iteration's batch."""
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, STEPS + 1))
    efficiency = {r["iteration"]: r["packing_efficiency"] for r in rows if r["split"] == "throughput"}
    return [{**r, "packing_efficiency": efficiency[r["iteration"]]} for r in train]


def _our_weights(save: Path, hf_dir: str, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from simpo_megatron.training.hf_checkpoint import export_checkpoint

    exported = export_checkpoint(str(save), str(out), hf_config_dir=hf_dir)
    return {
        k: v
        for f in sorted(os.listdir(exported))
        if f.endswith(".safetensors")
        for k, v in load_file(os.path.join(exported, f)).items()
    }


# ----------------------------------------------------------------------------- TRL


def _run_trl(hf_dir: str, pairs: list[dict], stream: list[list[dict]], out: str) -> dict:
    """TRL's CPOTrainer on one process over the pairs of ``stream``, in order, one step per global batch."""
    CPOConfig, CPOTrainer = _trl()
    import transformers
    from datasets import Dataset

    recorded: list[dict] = []

    class Recording(CPOTrainer):
        """CPOTrainer that also records the learning rate each step trains with (read in the step
        itself, whatever the moment transformers' log reads it)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            recorded.append({"lr": self.optimizer.param_groups[0]["lr"]})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    ordered = [pairs[s["index"]] for step in stream for s in step]
    args = CPOConfig(
        output_dir=out,
        loss_type="simpo",
        beta=BETA,
        simpo_gamma=BETA * GAMMA_BETA_RATIO,
        label_smoothing=LABEL_SMOOTHING,
        cpo_alpha=SFT_WEIGHT,
        **TRL_TRAINING_ARGS,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = Recording(model=model, args=args, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "rows": [dict(r) for r in trainer.train_dataset],
        "logs": [{**log, **rec} for log, rec in zip(logs, recorded, strict=True)],
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    _trl()  # before any training: without TRL every test here fails at once, saying why
    root = tmp_path_factory.mktemp("trl")
    hf_dir = make_hf_dir(root / "hf")
    pairs = make_pairs()
    prefix = preprocess(pairs, hf_dir, root)
    ours = {}
    for world, layouts in LAYOUTS.items():
        ours.update(run_distributed(_train_worker, world, layouts, hf_dir, prefix, str(root))[-1])
    trl = _run_trl(hf_dir, pairs, ours["stream"], str(root / "trl_out"))
    names = [n for layouts in LAYOUTS.values() for n in layouts]
    return {
        "initial": load_file(os.path.join(hf_dir, "model.safetensors")),
        "pairs": pairs,
        "stream": ours["stream"],
        "trl": trl,
        "metrics": {n: _our_metrics(root / n) for n in names},
        "weights": {n: _our_weights(root / n, hf_dir, root / f"{n}_hf") for n in names},
    }


# ----------------------------------------------------------------------------- tests


def test_packed_layout_packs(runs):
    """The packed run lays the same pairs out densely (so its agreement with TRL means something)."""
    for padded, packed in zip(runs["metrics"]["tp1_2mb"], runs["metrics"]["tp1_packed"], strict=True):
        assert packed["packing_efficiency"] > padded["packing_efficiency"] + 0.1, (padded, packed)


def test_trl_tokenizes_the_pairs_into_the_ids_we_train_on(runs):
    """TRL's tokenize_row (BOS on the prompt, EOS on each response) gives the ids our dataset
    holds, row for row in the order both trainers consume; those are the words' own ids."""
    rows = runs["trl"]["rows"]
    ours = [s for step in runs["stream"] for s in step]
    assert len(rows) == len(ours) == STEPS * GLOBAL_BATCH
    ids = lambda text: [int(w[1:]) for w in text.split()]  # noqa: E731
    for row, sample in zip(rows, ours, strict=True):
        pair = runs["pairs"][sample["index"]]
        assert sample["prompt"] == [1] + ids(pair["prompt"])
        assert (sample["chosen"], sample["rejected"]) == (ids(pair["chosen"]) + [2], ids(pair["rejected"]) + [2])
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"] == sample["prompt"] + sample[side]
            assert row[f"{side}_labels"] == [-100] * len(sample["prompt"]) + sample[side]
    lengths = {(len(s["prompt"]), len(s["chosen"]), len(s["rejected"])) for s in ours}
    assert len({c for _, c, _ in lengths}) > 1 and len({p for p, _, _ in lengths}) > 1


@pytest.mark.parametrize("name", [n for layouts in LAYOUTS.values() for n in layouts])
def test_per_step_losses_and_reward_metrics_equal_trl(runs, name):
    trl, ours = runs["trl"]["logs"], runs["metrics"][name]
    for key in METRICS + ("sft_loss", "grad_norm"):
        trl_key = {"sft_loss": "nll_loss"}.get(key, key)  # both: the SFT term before its weight
        mine, theirs = (
            torch.tensor([r[k] for r in rows], dtype=torch.float64) for rows, k in ((ours, key), (trl, trl_key))
        )
        torch.testing.assert_close(mine, theirs, atol=METRIC_ATOL, rtol=0, msg=f"{name}: {key}")
    # Our "lr" is the one after the iteration's update (read after the scheduler's step, as
    # Megatron-LM's training log reads it); TRL's (transformers 5) is the one the step trained
    # with. So ours at iteration k is TRL's at step k + 1 (warmup starts at 0 in both; the
    # linear decay ends at 0 after the last step).
    lrs = [r["lr"] for r in ours]
    assert lrs[:-1] == pytest.approx([r["lr"] for r in trl][1:], rel=1e-12) and lrs[-1] == 0.0
    # The run exercises what it compares: clipped and unclipped steps, accuracies that change.
    norms = [r["grad_norm"] for r in trl]
    assert max(norms) > CLIP > min(norms), norms
    assert len({r["rewards/accuracies"] for r in trl}) > 1


@pytest.mark.parametrize("name", [n for layouts in LAYOUTS.values() for n in layouts])
def test_final_weights_equal_trl(runs, name):
    trl, ours, initial = runs["trl"]["weights"], runs["weights"][name], runs["initial"]
    assert ours.keys() == trl.keys() == initial.keys()
    for key, value in trl.items():
        assert (value - initial[key]).abs().max() > 100 * WEIGHT_ATOL, key  # training moved it
        torch.testing.assert_close(ours[key], value, atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {key}")
