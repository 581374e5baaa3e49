"""Cost of HF's router load-balancing loss on a tiny mixture of experts on the CPU, one JSON line per case.

``bench_train.py``'s tiny model with its MLPs turned into 8 experts (top-2, each a quarter of
the dense width), on its UltraFeedback-like pairs at ``--seq-length`` 512, packed, 8 pairs a
step. Two runs on the same pairs and weights take turns step by step: the router loss off
(``--moe-aux-loss-coeff 0``) and on (0.01). On one process the loss adds each router's softmax
statistics and a gradient term; on two pipeline stages (PP=2, a gloo world of 2) it also adds
the stages' asynchronous exchange of those statistics (``model/moe.py``). The ratio on / off of
the step time is given as the ratio of the medians and as the median of the ratios paired in
time, on the wall clock and (one thread) on the CPU time of the last stage's process.

    python tools/bench/bench_router_loss.py [--rounds 10] [--steps 3] [--quick]
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

BENCH = "router_loss"
EXPERTS = dict(num_experts=8, moe_router_topk=2)
COEFF = 0.01


def _measure(rounds: int, steps: int, threads: int, pp: int) -> list[dict]:
    import torch
    from bench_train import MODEL, UF_SEQ, ultrafeedback_pairs

    from simpo_megatron.data.provider import global_batches
    from simpo_megatron.runtime import initialize_distributed, set_seed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    base = dict(MODEL, seq_length=UF_SEQ, moe_ffn_hidden_size=MODEL["ffn_hidden_size"] // 4, **EXPERTS)
    cfgs = {
        name: tiny_config(**base, packing=True, pipeline_model_parallel_size=pp, moe_aux_loss_coeff=coeff)
        for name, coeff in (("off", 0.0), ("on", COEFF))
    }
    for cfg in cfgs.values():
        cfg.validate(pp)
    initialize_distributed(cfgs["off"].parallel_layout(), seed=cfgs["off"].optimizer.seed)
    states = {}
    for name, cfg in cfgs.items():
        set_seed(cfg.optimizer.seed)  # the same initial weights
        states[name] = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    pairs = ultrafeedback_pairs(cfgs["off"].data.global_batch_size * steps, cfgs["off"].model.vocab_size)
    stream = global_batches(pairs, cfgs["off"], 0, 0, 0, 1, shuffle=False)
    batches = [next(stream) for _ in range(steps)]

    wall = {name: [] for name in cfgs}
    cpu = {name: [] for name in cfgs}
    losses = {name: None for name in cfgs}
    for r in range(rounds + 1):  # round 0 warms both up
        for i in range(steps):
            for name in ("off", "on") if (r + i) % 2 == 0 else ("on", "off"):
                start, cpu_start = time.perf_counter(), time.process_time()
                metrics = train_step(cfgs[name], states[name], batches[i])["metrics"]
                if r > 0:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
                if metrics is not None:
                    losses[name] = metrics
    if losses["on"] is not None and not losses["on"].get("load_balancing_loss", 0) > 0:
        raise AssertionError("the run with the router loss reported none")
    layout = f"pp{pp}"
    rows = [
        {
            "bench": BENCH,
            "case": f"{layout}_{name}",
            "threads": threads,
            "rounds": rounds,
            "steps": len(wall[name]),
            "median_step_s": round(statistics.median(wall[name]), 4),
            "median_step_cpu_s": round(statistics.median(cpu[name]), 4),
        }
        for name in cfgs
    ]
    ratio = {}
    for key, series in (("wall", wall), ("cpu", cpu)):
        ratio[f"ratio_of_medians_{key}"] = round(statistics.median(series["on"]) / statistics.median(series["off"]), 3)
        paired = [a / b for a, b in zip(series["on"], series["off"], strict=True)]
        ratio[f"median_of_ratios_{key}"] = round(statistics.median(paired), 3)
    rows.append(
        {"bench": BENCH, "case": f"{layout}_router_loss", "compares": "on / off", "measure": "step time", **ratio}
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="Measured rounds (one warm-up round more).")
    parser.add_argument("--steps", type=int, default=3, help="Global batches of 8 pairs a round.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per process.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1 round of 1 step.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if min(args.rounds, args.steps, args.threads) < 1:
        parser.error("--rounds, --steps and --threads must be >= 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train, in the workers too
    for pp in (1, 2):
        # The last rank holds the last stage: its process reports.
        for row in run_distributed(_measure, pp, args.rounds, args.steps, args.threads, pp, timeout=3600)[-1]:
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
