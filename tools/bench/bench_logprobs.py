"""The log-prob head against a naive full-vocabulary log_softmax: time and peak memory.

Both compute the log-prob of each label (forward and backward) from logits [s, b, V]: ours
through megatron-core's vocab-parallel cross entropy (at TP=1 here; it works in place on the
fp32 logits and never materializes a second [s, b, V] tensor of log-probs), the naive one as
``log_softmax(logits.float()).gather(labels)``, as TRL and the SimPO repository do. Each case
runs in a fresh process, so the peak resident memory above its baseline is its own. One JSON
line per case, then the ratios.

The second comparison starts one step earlier, from the last hidden states ``[tokens, hidden]``
and the output weight ``[V, hidden]`` (Llama-3's V=128256 by default): the chunked head
(``chunked_vocab_parallel_token_logps``, which never holds more than ``--chunk`` tokens of
logits) against ``log_softmax(h @ W.T).gather`` (forward and backward, gradients for both).

    python tools/bench/bench_logprobs.py [--seq 512] [--batch 8] [--vocab 32000] [--dtype bfloat16]
        [--head-tokens 4096] [--head-hidden 1024] [--head-vocab 128256] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed  # noqa: E402


def _peak_mib() -> float:
    """Peak resident memory since the last ``_reset_peak()`` (Linux VmHWM), else since start."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Reset the peak to the current resident memory (Linux); return the current peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _peak_mib()


def _measure(prepare, compute, repeats: int) -> dict:
    """``compute(*prepare())`` ``repeats`` times: the median time of ``compute`` (``prepare``'s
    fresh inputs untimed) and the peak resident memory above the start."""
    times = []
    before = _reset_peak()
    for _ in range(repeats):
        inputs = prepare()
        start = time.perf_counter()
        compute(*inputs)
        times.append(time.perf_counter() - start)
        del inputs
    return {"median_s": round(sorted(times)[len(times) // 2], 4), "peak_extra_mib": round(_peak_mib() - before, 1)}


def _case(method: str, seq: int, batch: int, vocab: int, dtype_name: str, repeats: int) -> dict:
    import torch

    from simpo_megatron.logprobs import vocab_parallel_token_logps
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed

    initialize_distributed(ParallelLayout())
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (seq, batch), generator=gen)
    base = torch.randn(seq, batch, vocab, generator=gen).to(dtype)

    def compute(logits):
        if method == "vocab_parallel":
            logps = vocab_parallel_token_logps(logits, labels, vocab_size=vocab)
        else:
            logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        logps.sum().backward()

    return {
        "bench": "logprob_head",
        "case": method,
        "shape": [seq, batch, vocab],
        "dtype": dtype_name,
        **_measure(lambda: (base.clone().requires_grad_(True),), compute, repeats),
        "logits_mib": round(base.numel() * base.element_size() / 2**20, 1),
    }


def _head_case(method: str, tokens: int, hidden: int, vocab: int, chunk: int, dtype_name: str, repeats: int) -> dict:
    import torch

    from simpo_megatron.logprobs import chunked_vocab_parallel_token_logps
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed

    initialize_distributed(ParallelLayout())
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (tokens, 1), generator=gen)
    h0 = torch.randn(tokens, 1, hidden, generator=gen).to(dtype)
    weight = (0.02 * torch.randn(vocab, hidden, generator=gen)).to(dtype).requires_grad_(True)

    def prepare():
        weight.grad = None
        return (h0.clone().requires_grad_(True),)

    def compute(h):
        if method == "chunked_head":
            logps = chunked_vocab_parallel_token_logps(h, weight, labels, vocab, chunk_size=chunk)
        else:
            logits = (h @ weight.t()).float()
            logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            del logits
        logps.sum().backward()

    return {
        "bench": "logprob_head_from_hidden",
        "case": method,
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "chunk": chunk if method == "chunked_head" else None,
        "dtype": dtype_name,
        **_measure(prepare, compute, repeats),
        "fp32_logits_mib": round(tokens * vocab * 4 / 2**20, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-tokens", type=int, default=4096)
    parser.add_argument("--head-hidden", type=int, default=1024)
    parser.add_argument("--head-vocab", type=int, default=128256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--only", choices=["logits", "head"], default=None, help="Run one comparison only.")
    args = parser.parse_args(argv)
    if args.only != "logits":
        head = (args.head_tokens, args.head_hidden, args.head_vocab, args.chunk, args.dtype, args.repeats)
        chunked = run_distributed(_head_case, 1, "chunked_head", *head, timeout=3600)[0]
        naive = run_distributed(_head_case, 1, "naive_linear_log_softmax", *head, timeout=3600)[0]
        print(json.dumps(chunked), flush=True)
        print(json.dumps(naive), flush=True)
        print(
            json.dumps(
                {
                    "bench": "logprob_head_from_hidden",
                    "case": "ratio",
                    "ours_over_naive_peak_memory": round(
                        chunked["peak_extra_mib"] / max(naive["peak_extra_mib"], 1e-9), 3
                    ),
                    "ours_over_naive_time": round(chunked["median_s"] / naive["median_s"], 3),
                }
            ),
            flush=True,
        )
        if args.only == "head":
            return 0
    shape = (args.seq, args.batch, args.vocab, args.dtype, args.repeats)
    ours = run_distributed(_case, 1, "vocab_parallel", *shape)[0]
    naive = run_distributed(_case, 1, "naive_log_softmax", *shape)[0]
    print(json.dumps(ours), flush=True)
    print(json.dumps(naive), flush=True)
    print(
        json.dumps(
            {
                "bench": "logprob_head",
                "case": "ratio",
                "naive_over_ours_time": round(naive["median_s"] / ours["median_s"], 3),
                "naive_over_ours_peak_memory": round(naive["peak_extra_mib"] / max(ours["peak_extra_mib"], 1e-9), 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
