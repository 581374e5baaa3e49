"""Throughput of a SimPO training step on a tiny Llama on the CPU, one JSON line per case.

The model of the issue: hidden 256, 4 layers, 8 heads, 4 query groups, vocabulary 8192,
256 tokens a sequence, 4 pairs a micro-batch (8 sequences). Two ways of doing the same work
(the same global batch of 8 pairs) are timed in one run, so their ratio survives a noisy
machine: one process (TP=1, all cores to torch) and two processes with TP=2 over gloo.
Tokens are counted as processed positions, 2 x pairs x seq_length, as Megatron-LM counts them.

    python tools/bench/bench_train.py [--steps 5] [--warmup 2]

``--workload ultrafeedback`` times the same tiny Llama at ``--seq-length`` 512 on pairs whose
prompt and response lengths are long-tailed like UltraFeedback's (log-normal, nothing
truncated): padded to --seq-length, padded to the longest sequence of each micro-batch, and
``--packing``, all on the same pairs (8 a step, as 2 micro-batches of 4), reporting pairs/s,
real (non-padding) tokens/s and the packing efficiency (real tokens / token slots); then TRL's
CPOTrainer(loss_type="simpo") on the same pairs and shape (a word-level tokenizer maps each
token id to one word, so TRL sees exactly these token sequences).

    python tools/bench/bench_train.py --workload ultrafeedback [--steps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

MODEL = dict(
    num_layers=4,
    hidden_size=256,
    ffn_hidden_size=704,
    num_attention_heads=8,
    num_query_groups=4,
    vocab_size=8192,
    seq_length=256,
    micro_batch_size=4,
    global_batch_size=8,
)


def _measure(tp: int, steps: int, warmup: int, threads: int) -> dict | None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, micro_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = tiny_config(**MODEL, tensor_model_parallel_size=tp)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    cfg.validate(world)
    initialize_distributed(ParallelLayout(tensor_model_parallel_size=tp), seed=cfg.optimizer.seed)
    data = build_datasets(cfg)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    stream = micro_batches(
        data.train,
        cfg,
        data.pad_id,
        0,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    n_mb = cfg.num_micro_batches(world)
    times = []
    for step in range(warmup + steps):
        batches = [next(stream) for _ in range(n_mb)]
        start = time.perf_counter()
        train_step(cfg, state, batches)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if dist.get_rank() != 0:
        return None
    seconds = sorted(times)[len(times) // 2]
    pairs = cfg.data.global_batch_size
    return {
        "bench": "train_step",
        "case": f"tp{tp}",
        "processes": world,
        "threads_per_process": threads,
        "median_step_s": round(seconds, 4),
        "pairs_per_s": round(pairs / seconds, 2),
        "tokens_per_s": round(2 * pairs * cfg.data.seq_length / seconds, 1),
        "steps": steps,
    }


UF_SEQ = 512


def ultrafeedback_pairs(num_pairs: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token pairs with UltraFeedback-like long-tailed lengths, all within ``UF_SEQ``.

    Prompt and responses are log-normal (medians 50 and 100 tokens), redrawn until the prompt
    and the longer response fit, so nothing is truncated (BOS 1, EOS 2, ids from 3).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num_pairs:
        p, c, r = (int(x) + 1 for x in rng.lognormal([np.log(50), np.log(100), np.log(100)], [0.8, 0.7, 0.7]))
        if p + max(c, r) > UF_SEQ:
            continue
        ids = lambda n: rng.integers(3, vocab, n).astype(np.int64)  # noqa: E731
        pairs.append(
            {
                "prompt": np.concatenate([[1], ids(p - 1)]).astype(np.int64),
                "chosen": np.concatenate([ids(c - 1), [2]]).astype(np.int64),
                "rejected": np.concatenate([ids(r - 1), [2]]).astype(np.int64),
            }
        )
    return pairs


UF_CASES = {
    "padded_to_seq_length": {"pad_to_multiple_of": 0},
    "padded_to_longest": {"pad_to_multiple_of": 8},
    "packed": {"packing": True},
}


def _measure_workload(case: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from simpo_megatron.data.provider import global_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = tiny_config(**{**MODEL, "seq_length": UF_SEQ}, **UF_CASES[case])
    cfg.validate(1)
    initialize_distributed(ParallelLayout(), seed=cfg.optimizer.seed)
    pairs = ultrafeedback_pairs(cfg.data.global_batch_size * (warmup + steps), cfg.model.vocab_size)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    stream = global_batches(pairs, cfg, 0, 0, 0, 1, shuffle=False)
    times, cpu, tokens, slots, micro = [], 0.0, 0, 0, 0
    for step in range(warmup + steps):
        batches = next(stream)
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(cfg, state, batches)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
            tokens += sum(b.num_tokens for b in batches)
            slots += sum(b.tokens.numel() for b in batches)
            micro += len(batches)
    total = sum(times)
    return {
        "bench": "train_step_ultrafeedback",
        "case": case,
        "seq_length": UF_SEQ,
        "threads": threads,
        "steps": steps,
        "median_step_s": round(sorted(times)[len(times) // 2], 4),
        "pairs_per_s": round(cfg.data.global_batch_size * steps / total, 3),
        "real_tokens_per_s": round(tokens / total, 1),
        "pairs_per_cpu_s": round(cfg.data.global_batch_size * steps / cpu, 3),
        "packing_efficiency": round(tokens / slots, 4),
        "real_tokens_per_pair": round(tokens / (cfg.data.global_batch_size * steps), 1),
        "micro_batches_per_step": micro / steps,
    }


def _measure_trl(steps: int, warmup: int, threads: int) -> dict:
    """TRL's CPOTrainer(loss_type="simpo") on the same pairs, model shape and batch split."""
    import tempfile

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    torch.set_num_threads(threads)
    vocab = MODEL["vocab_size"]
    pairs = ultrafeedback_pairs(MODEL["global_batch_size"] * (warmup + steps), vocab)
    # The special tokens' names occur in no word: the tokenizer finds special tokens inside words
    # (with bos_token "w1", "w123" would be BOS + unknown).
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    # TRL adds BOS to the prompt and EOS to the responses itself.
    dataset = Dataset.from_list(
        [
            {
                "prompt": text(p["prompt"][1:]),
                "chosen": " " + text(p["chosen"][:-1]),
                "rejected": " " + text(p["rejected"][:-1]),
            }
            for p in pairs
        ]
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=MODEL["hidden_size"],
            intermediate_size=MODEL["ffn_hidden_size"],
            num_hidden_layers=MODEL["num_layers"],
            num_attention_heads=MODEL["num_attention_heads"],
            num_key_value_heads=MODEL["num_query_groups"],
            max_position_embeddings=UF_SEQ,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu_start)

    mbs = MODEL["micro_batch_size"]
    with tempfile.TemporaryDirectory() as out:
        args = CPOConfig(
            output_dir=out,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=2.0,
            simpo_gamma=1.0,
            per_device_train_batch_size=mbs,
            gradient_accumulation_steps=MODEL["global_batch_size"] // mbs,
            max_steps=warmup + steps,
            max_length=UF_SEQ,
            learning_rate=1e-4,
            report_to=[],
            logging_steps=1000,
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_dropout=True,
            seed=0,
            data_seed=0,
        )
        trainer = CPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()]
        )
        for row, p in zip(trainer.train_dataset, pairs, strict=True):  # TRL trains on these very tokens
            for side in ("chosen", "rejected"):
                if row[f"{side}_input_ids"] != p["prompt"].tolist() + p[side].tolist():
                    raise AssertionError(f"TRL's {side} tokens differ from the pair's")
        trainer.train()
    measured = times[warmup:]
    total = sum(measured)
    real = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs[warmup * 8 :])
    return {
        "bench": "train_step_ultrafeedback",
        "case": "trl_cpo_simpo",
        "seq_length": UF_SEQ,
        "threads": threads,
        "steps": steps,
        "median_step_s": round(sorted(measured)[len(measured) // 2], 4),
        "pairs_per_s": round(MODEL["global_batch_size"] * steps / total, 3),
        "real_tokens_per_s": round(real / total, 1),
        "pairs_per_cpu_s": round(MODEL["global_batch_size"] * steps / sum(cpu[warmup:]), 3),
    }


def _ultrafeedback(args) -> int:
    cores = os.cpu_count() or 1
    results = {
        case: run_distributed(_measure_workload, 1, case, args.steps, args.warmup, cores, timeout=3600)[0]
        for case in UF_CASES
    }
    for r in results.values():
        print(json.dumps(r), flush=True)
    # On a shared machine wall time swings with the neighbours' load; CPU time (all threads of
    # the training process) measures the work itself, so the ratios are given for both.
    ratio = {"bench": "train_step_ultrafeedback", "case": "ratio"}
    for key in ("pairs_per_s", "pairs_per_cpu_s"):
        for other in ("padded_to_seq_length", "padded_to_longest"):
            ratio[f"packed_over_{other}_{key}"] = round(results["packed"][key] / results[other][key], 3)
    if not args.no_trl:
        try:
            trl = _measure_trl(args.steps, args.warmup, cores)
        except ImportError as e:
            print(json.dumps({"bench": "train_step_ultrafeedback", "case": "trl_cpo_simpo", "skipped": str(e)}))
        else:
            print(json.dumps(trl), flush=True)
            for key in ("pairs_per_s", "pairs_per_cpu_s"):
                for case in ("packed", "padded_to_seq_length"):
                    ratio[f"{case}_over_trl_{key}"] = round(results[case][key] / trl[key], 3)
    print(json.dumps(ratio), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workload", choices=["fixed", "ultrafeedback"], default="fixed")
    parser.add_argument("--no-trl", action="store_true", help="Skip TRL's CPOTrainer in the ultrafeedback workload.")
    args = parser.parse_args(argv)
    if args.workload == "ultrafeedback":
        return _ultrafeedback(args)
    cores = os.cpu_count() or 1
    one = run_distributed(_measure, 1, 1, args.steps, args.warmup, cores)[0]
    two = run_distributed(_measure, 2, 2, args.steps, args.warmup, max(1, cores // 2))[0]
    print(json.dumps(one), flush=True)
    print(json.dumps(two), flush=True)
    print(
        json.dumps(
            {
                "bench": "train_step",
                "case": "ratio",
                "tp2_over_tp1_tokens_per_s": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
