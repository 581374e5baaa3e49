"""Cost of the reference-based losses on a tiny Llama on the CPU, one JSON line per case.

The workload of ``bench_train.py --workload ultrafeedback`` (its tiny Llama at ``--seq-length``
512, 8 pairs a step as micro-batches of 4, long-tailed UltraFeedback-like pairs), on one
process (a gloo world of 1). Three comparisons, each on the same pairs:

- ``reference_pass``: the pairs/s of the reference pass (``score_dataset``, forward only) of a
  packed run and of a padded one (which scores packed on the local layers) against a packed
  SimPO ``train_step`` on the same pairs (and the padded run's pass against a SimPO step
  padded to the longest);
- ``dpo_step``: a packed DPO step (the pairs carrying their reference scores) against a packed
  SimPO step;
- ``simpo_vs_lm``: a packed SimPO step against a plain language-model step on the same packed
  micro-batches: the GPTModel called with labels returns megatron-core's per-token
  cross-entropy, masked to the same response tokens, summed and counted as Megatron-LM's
  ``pretrain_gpt`` does, through the same schedule, optimizer and finiteness check.

A round runs the step cases on each of ``--steps`` global batches in turn (the order rotated
from batch to batch), then each pass over all the round's pairs, so a neighbour's load falls on
every case alike. Each case's figure is the median over rounds; each ratio is given as the ratio
of the medians and as the median of the ratios paired in time (step by step for two steps,
round by round for a pass against steps), on the wall clock and on the process's CPU time. On
one thread (``--threads 1``, the default) the CPU time is the work itself, which a loaded
machine moves far less than the wall clock: the goals are judged on it. Training steps are timed
as ``bench_train.py`` times them (collated micro-batches in hand); a pass is timed whole,
collation and packing included.

    python tools/bench/bench_reference.py [--rounds 10] [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

BENCH = "reference"
# (case, numerator, denominator, goal, "min" / "max": the ratio must stay at or above / below it)
COMPARISONS = (
    ("reference_pass", "reference_packed", "simpo_step", 2.5, "min"),
    ("reference_pass_padded", "reference_padded", "simpo_step", 2.5, "min"),
    ("reference_pass_padded_vs_padded_step", "reference_padded", "simpo_step_padded", None, None),
    ("dpo_step", "dpo_step", "simpo_step", 1.05, "max"),
    ("simpo_vs_lm", "simpo_step", "lm_step", 1.05, "max"),
)
# Throughputs compare as pairs/s (numerator / denominator); steps compare as time.
RATES = ("reference_pass", "reference_pass_padded", "reference_pass_padded_vs_padded_step")


def lm_forward_step(data_iterator, model):
    """megatron-core's own language-model loss on a micro-batch, masked to its response tokens."""
    from functools import partial

    batch = next(data_iterator)
    output = model(
        batch.tokens,
        batch.position_ids,
        attention_mask=None,
        labels=batch.labels,
        packed_seq_params=None if batch.packed is None else batch.packed.seq_params(),
    )
    return output, partial(lm_loss_func, batch.loss_mask)


def lm_loss_func(loss_mask, output_tensor):
    """Megatron-LM ``pretrain_gpt``'s loss with ``calculate_per_token_loss``: (sum, tokens, report)."""
    import torch

    loss_sum = (output_tensor.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}


def lm_step(cfg, state, batches) -> float:
    """``train_step`` with the language-model loss: the same schedule, check and optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from simpo_megatron.training.trainer import _grads_are_finite

    for m in state.model:
        m.train()
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = get_forward_backward_func()(
        forward_step_func=lm_forward_step,
        data_iterator=iter(batches),
        model=state.model[0],
        num_microbatches=len(batches),
        seq_length=max(b.width for b in batches),
        micro_batch_size=batches[0].rows,
        forward_only=False,
    )
    if _grads_are_finite(state.model):
        ok, _, _ = state.optimizer.step()
        if ok:
            state.scheduler.step(increment=cfg.data.global_batch_size)
    total = sum(o["lm loss"] for o in outputs)
    return (total[0] / total[1]).item()


def _measure(rounds: int, steps: int, threads: int) -> list[dict]:
    import dataclasses

    import numpy as np
    import torch
    from bench_train import MODEL, UF_SEQ, ultrafeedback_pairs

    from simpo_megatron.data.provider import global_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.reference import score_dataset
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    packed = tiny_config(**{**MODEL, "seq_length": UF_SEQ}, packing=True)
    packed.validate(1)
    padded = dataclasses.replace(packed, data=dataclasses.replace(packed.data, packing=False))  # to the longest
    dpo = dataclasses.replace(
        packed, loss=dataclasses.replace(packed.loss, loss_type="dpo", beta=0.1, gamma_beta_ratio=0.0)
    )
    initialize_distributed(ParallelLayout(), seed=packed.optimizer.seed)
    # One model for every case: the weights drift from case to case, the work does not.
    state = setup_model_and_optimizer(packed, packed.padded_vocab_size())
    pad_id = 0
    pairs = ultrafeedback_pairs(packed.data.global_batch_size * steps, packed.model.vocab_size)

    def steps_of(cfg, samples):
        stream = global_batches(samples, cfg, pad_id, 0, 0, 1, shuffle=False)
        return [next(stream) for _ in range(steps)]

    scores = score_dataset(packed, state, pairs, pad_id)
    if not np.isfinite(scores).all():
        raise AssertionError("the reference pass left pairs unscored")
    simpo_batches = steps_of(packed, pairs)
    dpo_batches = steps_of(dpo, [{**p, "reference": row} for p, row in zip(pairs, scores, strict=True)])
    for s, d in zip(simpo_batches, dpo_batches, strict=True):
        if len(s) != len(d) or not all(torch.equal(a.tokens, b.tokens) for a, b in zip(s, d)):
            raise AssertionError("the DPO and SimPO steps must see the same packed micro-batches")
    padded_batches = steps_of(padded, pairs)

    skipped = {"simpo_step": 0, "simpo_step_padded": 0, "dpo_step": 0}

    def train(cfg, batches, name):
        def run(i):
            skipped[name] += train_step(cfg, state, batches[i])["skipped"]

        return run

    # A step case times one global batch; a pass case scores every pair of the round.
    step_cases = {
        "simpo_step": train(packed, simpo_batches, "simpo_step"),
        "simpo_step_padded": train(padded, padded_batches, "simpo_step_padded"),
        "dpo_step": train(dpo, dpo_batches, "dpo_step"),
        "lm_step": lambda i: lm_step(packed, state, simpo_batches[i]),
    }
    pass_cases = {
        "reference_packed": lambda: score_dataset(packed, state, pairs, pad_id),
        "reference_padded": lambda: score_dataset(padded, state, pairs, pad_id),
    }
    wall = {n: [] for n in [*step_cases, *pass_cases]}
    cpu = {n: [] for n in wall}

    def timed(name, fn, *args, keep):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(*args)
        if keep:
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)

    def rotated(names, k):
        names = list(names)
        return names[k % len(names) :] + names[: k % len(names)]

    for r in range(rounds + 1):  # round 0 warms every case up
        for i in range(steps):  # the step cases take turns on each global batch
            for name in rotated(step_cases, r + i):
                timed(name, step_cases[name], i, keep=r > 0)
        for name in rotated(pass_cases, r):
            timed(name, pass_cases[name], keep=r > 0)

    def round_totals(series: list[float]) -> list[float]:
        return [sum(series[j : j + steps]) for j in range(0, len(series), steps)] if len(series) > rounds else series

    n = len(pairs)
    real_tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    rows = []
    for name in wall:
        seconds = statistics.median(round_totals(wall[name]))
        rows.append(
            {
                "bench": BENCH,
                "case": name,
                "threads": threads,
                "rounds": rounds,
                "pairs_per_round": n,
                "median_round_s": round(seconds, 4),
                "pairs_per_s": round(n / seconds, 3),
                "pairs_per_cpu_s": round(n / statistics.median(round_totals(cpu[name])), 3),
                "real_tokens_per_s": round(real_tokens / seconds, 1),
                **({"skipped_steps": skipped[name]} if name in skipped else {}),
            }
        )
    for case, a, b, goal, sense in COMPARISONS:
        ratio = {}
        for key, series in (("wall", wall), ("cpu", cpu)):
            # pairs/s of a over b is b's time over a's; round totals, or step by step for two steps
            num, den = (series[b], series[a]) if case in RATES else (series[a], series[b])
            totals = [statistics.median(round_totals(t)) for t in (num, den)]
            ratio[f"ratio_of_medians_{key}"] = round(totals[0] / totals[1], 3)
            if case in RATES:
                num, den = round_totals(num), round_totals(den)
            paired = [x / y for x, y in zip(num, den, strict=True)]
            ratio[f"median_of_ratios_{key}"] = round(statistics.median(paired), 3)
        row = {
            "bench": BENCH,
            "case": case,
            "compares": f"{a} / {b}",
            "measure": "pairs/s" if case in RATES else "step time",
            **ratio,
        }
        if goal is not None:
            # Judged on CPU time paired in time: on one thread it is the work itself, which a
            # neighbour's load moves far less than the wall clock.
            value = ratio["median_of_ratios_cpu"]
            row["goal"] = f"{'>=' if sense == 'min' else '<='} {goal}"
            row["goal_met"] = bool(value >= goal if sense == "min" else value <= goal)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="Measured rounds (one warm-up round more).")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="Global batches of 8 pairs a round (each step case runs each; the passes score all).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch threads (1: the process's CPU time is the work, whatever the neighbours do).",
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1 round of 1 step.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if min(args.rounds, args.steps, args.threads) < 1:
        parser.error("--rounds, --steps and --threads must be >= 1")
    rows = run_distributed(_measure, 1, args.rounds, args.steps, args.threads, timeout=7200)[0]
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
