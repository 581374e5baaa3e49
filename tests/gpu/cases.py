"""GPU cases, run by tests/gpu/test_gpu_training.py in a child process that sees the GPUs.

``python tests/gpu/cases.py NAME`` runs one group of cases and prints its findings as one JSON
line, ``{case: result}``; the tests assert on them. A case that raises reports ``{"error":
traceback}`` and the others still run. Groups:

  probe   what this process has: CUDA, compute capability, GPU count, Transformer Engine
  single  one GPU: 6 training steps each on local layers (bf16), TE layers (bf16) and TE with
          FP8; TE against local layers on the same weights, padded and packed (THD); TE packed
          against padded; one FP8 step against one bf16 step; a mixture of experts on TE
          against local layers, padded and packed
  sp      two GPUs (TP=2, TE): the chunked log-prob head with sequence parallelism against without
  cp      two GPUs (TE): context parallelism 2 against 1 (data parallelism 2), padded and packed

Equivalence: a comparison runs one forward and backward over one global batch (no update) on
two models holding the same weights and reports, each with its bound, the largest difference
of the mean log-probs (``logps/chosen``, ``logps/rejected``, nats per token), of the loss, and
the relative L2 difference of all gradients. bf16 results differ by rounding whatever the
layers, so each bf16 bound is measured, not guessed: the same model in fp32 (local layers)
gives the truth, and two bf16 results must agree within ``BF16_SLACK`` times the baseline's own
distance from it, plus a floor (``BF16_FLOOR``) for when that distance is tiny.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*", category=UserWarning)

if __package__ in (None, ""):  # run as a script: import this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BF16_SLACK = 4.0
BF16_FLOOR = {"logps": 1e-2, "loss": 1e-2, "grads": 2e-2}
# FP8 (E4M3 forward: 3 mantissa bits, a relative rounding of up to 2^-4 per element) against
# bf16 on the same weights: each GEMM's output moves by a few percent, per token log-probs by a
# few hundredths of a nat, and averaged over a sequence's ~30 tokens and the batch the mean
# log-probs and the SimPO loss move by about 0.01. Bound: 0.05 (5x that), absolute, on both.
FP8_BOUND = {"logps": 0.05, "loss": 0.05}
MEAN_LOGPS = ("logps/chosen", "logps/rejected")


def probe() -> dict:
    info = {"cuda": torch.cuda.is_available(), "capability": None, "gpus": 0, "te": None}
    if info["cuda"]:
        info["capability"] = list(torch.cuda.get_device_capability())
        info["device"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails on load
        info["te"] = str(e) or type(e).__name__
    return info


def _config(impl: str, fp8: bool = False, bf16: bool = True, **overrides):
    """The tiny model of every case: dimensions FP8 GEMMs accept (multiples of 16), no dropout,
    and weights large enough (std 0.1) that the log-probs are far from uniform."""
    from simpo_megatron.testing import tiny_config

    fp8_flags = (
        dict(fp8_format="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")
        if fp8
        else {}
    )
    values = dict(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=200,
        seq_length=64,
        micro_batch_size=2,
        global_batch_size=8,
        transformer_impl=impl,
        bf16=bf16,
        init_method_std=0.1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        lr=1e-3,
        train_iters=6,
    )
    return tiny_config(**{**values, **fp8_flags, **overrides})


# ------------------------------------------------------------------ weights and one pass


def canonical_name(name: str, moe: bool = False) -> str:
    """A parameter's name in the Transformer Engine spec: the local spec's norms are separate
    modules where TE fuses them into the next linear (megatron-core's own checkpoint key map).
    An MoE layer's pre-MLP norm stays separate in TE too (its experts are not one linear)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    for old, new in get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map.items():
        if not (moe and old == "pre_mlp_layernorm."):
            name = name.replace("." + old, "." + new)
    return name


def named_params(state) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters of the (single-chunk) model, by canonical name."""
    from megatron.core.utils import unwrap_model

    chunk = unwrap_model(state.model[0])
    moe = any(".router." in n for n, _ in chunk.named_parameters())
    return {canonical_name(n, moe): p for n, p in chunk.named_parameters() if p.numel() > 0}


def export_weights(state) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in named_params(state).items()}


@torch.no_grad()
def load_weights(state, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (by canonical name, this rank's shards) into the model, cast to its
    dtype, and refresh the optimizer's fp32 copies."""
    params = named_params(state)
    if params.keys() != weights.keys():
        raise KeyError(
            f"parameter names differ: only in the model {sorted(params.keys() - weights.keys())}, "
            f"only in the weights {sorted(weights.keys() - params.keys())}"
        )
    for name, p in params.items():
        if p.shape != weights[name].shape:
            raise ValueError(f"{name}: shape {tuple(p.shape)} against {tuple(weights[name].shape)}")
        p.copy_(weights[name])
    state.optimizer.reload_model_params()


def forward_backward(cfg, state, batches) -> dict:
    """One forward and backward over the global batch, no update: its metrics and this rank's
    final (fp32, reduced and scaled) gradients by canonical name."""
    from megatron.core import parallel_state

    from simpo_megatron.training.step import reduce_metrics
    from simpo_megatron.training.trainer import run_schedule

    for m in state.model:
        m.train()
        m.zero_grad_buffer()
    outputs = run_schedule(cfg, state.model, batches, forward_only=False)
    metrics = reduce_metrics(outputs, group=parallel_state.get_data_parallel_group())
    grads = {name: p.main_grad.detach().float().clone() for name, p in named_params(state).items()}
    return {"metrics": metrics, "grads": grads}


def differences(a: dict, b: dict) -> dict[str, float]:
    """How far pass ``a`` is from pass ``b``: mean log-probs and loss (absolute), gradients
    (relative L2 over all parameters, all ranks)."""
    logps = max(abs(a["metrics"][k] - b["metrics"][k]) for k in MEAN_LOGPS)
    loss = abs(a["metrics"]["loss"] - b["metrics"]["loss"])
    sums = torch.zeros(2, dtype=torch.float64, device=next(iter(b["grads"].values())).device)
    for name, g in b["grads"].items():
        sums[0] += (a["grads"][name] - g).double().pow(2).sum()
        sums[1] += g.double().pow(2).sum()
    if torch.distributed.is_initialized():  # gradient shards: the norm of the whole
        from megatron.core import parallel_state

        torch.distributed.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
    return {"logps": logps, "loss": loss, "grads": math.sqrt(sums[0] / sums[1])}


def bf16_comparison(candidate: dict, baseline: dict, truth: dict) -> dict:
    """``candidate`` against ``baseline`` (both bf16), each bound measured against the fp32 ``truth``."""
    found, noise = differences(candidate, baseline), differences(baseline, truth)
    bounds = {k: BF16_SLACK * noise[k] + BF16_FLOOR[k] for k in found}
    return {
        "diff": found,
        "bound": bounds,
        "baseline_vs_fp32": noise,
        "candidate_vs_fp32": differences(candidate, truth),
        "loss": candidate["metrics"]["loss"],
    }


def global_batch(cfg, dp_rank: int = 0, dp_size: int = 1):
    """The first global batch of ``cfg``'s mock data, this data-parallel rank's micro-batches."""
    from simpo_megatron.data.provider import build_datasets, global_batches

    data = build_datasets(cfg)
    return next(global_batches(data.train, cfg, data.pad_id, 0, dp_rank, dp_size, shuffle=False))


def _guarded(results: dict, name: str, fn, *args) -> None:
    """``results[name] = fn(*args)``, or the traceback: one failing case does not stop the rest."""
    try:
        results[name] = fn(*args)
    except Exception:  # noqa: BLE001 - reported to the test
        results[name] = {"error": traceback.format_exc()}


# ------------------------------------------------------------------ training (one GPU)


class _DtypeSpies:
    """Record the dtypes that flow through the training step's log-prob head and loss."""

    def __init__(self):
        import simpo_megatron.logprobs as logprobs
        import simpo_megatron.training.step as step

        self.seen = {"softmax_logits": set(), "token_logps": set(), "seq_logps": set(), "losses": set()}
        cross_entropy = logprobs.tensor_parallel.vocab_parallel_cross_entropy
        token_logps = step.vocab_parallel_token_logps
        seq_sums = step.sequence_sums
        get_loss = step.get_loss

        def spy_cross_entropy(logits, target, *args, **kwargs):
            self.seen["softmax_logits"].add(str(logits.dtype))
            return cross_entropy(logits, target, *args, **kwargs)

        def spy_token_logps(*args, **kwargs):
            out = token_logps(*args, **kwargs)
            self.seen["token_logps"].add(str(out.dtype))
            return out

        def spy_seq_sums(*args, **kwargs):
            sums, counts = seq_sums(*args, **kwargs)
            self.seen["seq_logps"].add(str(sums.dtype))
            return sums, counts

        def spy_get_loss(name):
            loss = get_loss(name)

            class Recorded:
                def __getattr__(_, attr):
                    return getattr(loss, attr)

                def compute(_, *args, **kwargs):
                    out = loss.compute(*args, **kwargs)
                    self.seen["losses"].add(str(out.losses.dtype))
                    return out

            return Recorded()

        self._restore = [
            (logprobs.tensor_parallel, "vocab_parallel_cross_entropy", cross_entropy),
            (step, "vocab_parallel_token_logps", token_logps),
            (step, "sequence_sums", seq_sums),
            (step, "get_loss", get_loss),
        ]
        logprobs.tensor_parallel.vocab_parallel_cross_entropy = spy_cross_entropy
        step.vocab_parallel_token_logps = spy_token_logps
        step.sequence_sums = spy_seq_sums
        step.get_loss = spy_get_loss

    def restore(self) -> None:
        for owner, name, value in self._restore:
            setattr(owner, name, value)


def _is_te_module(module: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformer_engine") for cls in type(module).__mro__)


def train(impl: str, fp8: bool) -> dict:
    """Train 6 steps on one repeated global batch of mock pairs; report what the test checks."""
    from megatron.core.utils import unwrap_model

    from simpo_megatron.training.trainer import eval_step, setup_model_and_optimizer, train_step

    cfg = _config(impl, fp8, global_batch_size=4, seq_length=32)
    cfg.validate(1)
    spies = _DtypeSpies()
    try:
        state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
        model = state.model[0]
        config = unwrap_model(model).config
        te_modules = [m for m in model.modules() if _is_te_module(m)]
        batches = global_batch(cfg)
        before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        steps, zero_grads, fp8_modules = [], None, []
        for i in range(cfg.optimizer.train_iters):
            result = train_step(cfg, state, batches)
            metrics = result["metrics"] or {}
            steps.append(
                {
                    "skipped": result["skipped"],
                    "grad_norm": result["grad_norm"],
                    "loss": metrics.get("loss"),
                    "num_pairs": metrics.get("num_pairs"),
                    "finite": all(math.isfinite(v) for v in metrics.values()),
                }
            )
            if i == 0:
                # DDP keeps each gradient in main_grad until the next step.
                zero_grads = [
                    name
                    for name, p in model.named_parameters()
                    if p.requires_grad and not p.main_grad.float().abs().sum() > 0
                ]
                fp8_modules = [type(m).__name__ for m in te_modules if getattr(m, "fp8", False)]
        changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach().float())]
        valid = eval_step(cfg, state, batches)
    finally:
        spies.restore()
    return {
        "device": str(next(model.parameters()).device),
        "params_dtype": str(config.params_dtype),
        "fp8": config.fp8,
        "fp8_recipe": str(config.fp8_recipe) if config.fp8 else None,
        "te_modules": len(te_modules),
        "fp8_modules": fp8_modules,
        "steps": steps,
        "zero_grads": zero_grads,
        "changed_qkv": any("linear_qkv.weight" in name for name in changed),
        "valid_finite": valid is not None and all(math.isfinite(v) for v in valid.values()),
        "dtypes": {k: sorted(v) for k, v in spies.seen.items()},
    }


# ------------------------------------------------------------------ equivalence (one GPU)


def _models(weights_from: str, world_size: int, **cfgs):
    """Build each named config's model (with optimizer) and give them ``weights_from``'s weights."""
    from simpo_megatron.training.trainer import setup_model_and_optimizer

    states = {}
    for name, cfg in cfgs.items():
        cfg.validate(world_size)
        states[name] = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    weights = export_weights(states[weights_from])
    for name, state in states.items():
        if name != weights_from:
            load_weights(state, weights)
    return states


def te_against_local(capability: tuple[int, int]) -> dict:
    """TE and local layers on the same weights, padded and packed; TE packed against padded;
    an FP8 step's loss against the bf16 step's."""
    from simpo_megatron.training.trainer import train_step

    cfgs = {"local": _config("local"), "fp32": _config("local", bf16=False), "te": _config("transformer_engine")}
    fp8 = capability >= (8, 9)
    if fp8:
        cfgs["fp8"] = _config("transformer_engine", fp8=True)
    states = _models("local", 1, **cfgs)
    # The same global batch of pairs, padded to its longest sequence and packed (THD).
    padded, packed = global_batch(cfgs["local"]), global_batch(cfgs["local"].replace(packing=True))
    results, passes = {}, {}
    for kind, batches in (("padded", padded), ("packed", packed)):
        for model in ("fp32", "local", "te"):
            passes[model, kind] = forward_backward(cfgs[model], states[model], batches)
    results["te_vs_local_padded"] = bf16_comparison(
        passes["te", "padded"], passes["local", "padded"], passes["fp32", "padded"]
    )
    results["te_vs_local_packed"] = bf16_comparison(
        passes["te", "packed"], passes["local", "packed"], passes["fp32", "packed"]
    )
    results["te_packed_vs_padded"] = bf16_comparison(
        passes["te", "packed"], passes["te", "padded"], passes["fp32", "padded"]
    )
    results["te_packed_vs_padded"]["num_micro_batches"] = {"padded": len(padded), "packed": len(packed)}
    if fp8:
        bf16_step = train_step(cfgs["te"], states["te"], padded)["metrics"]
        fp8_step = train_step(cfgs["fp8"], states["fp8"], padded)["metrics"]
        found = {
            "logps": max(abs(fp8_step[k] - bf16_step[k]) for k in MEAN_LOGPS),
            "loss": abs(fp8_step["loss"] - bf16_step["loss"]),
        }
        results["fp8_vs_bf16"] = {"diff": found, "bound": dict(FP8_BOUND), "loss": fp8_step["loss"]}
    else:
        results["fp8_vs_bf16"] = {"skipped": f"FP8 needs compute capability 8.9; this GPU is {capability}"}
    return results


def moe_te_against_local() -> dict:
    """A mixture of experts (4 experts, top-2, the router load-balancing loss on) on TE and on
    local layers, same weights, padded and packed."""
    moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64, moe_aux_loss_coeff=0.1)
    cfgs = {
        "local": _config("local", **moe),
        "fp32": _config("local", bf16=False, **moe),
        "te": _config("transformer_engine", **moe),
    }
    states = _models("local", 1, **cfgs)
    results = {}
    for kind in ("padded", "packed"):
        batches = global_batch(cfgs["local"].replace(packing=kind == "packed"))
        passes = {name: forward_backward(cfgs[name], states[name], batches) for name in cfgs}
        results[f"moe_te_vs_local_{kind}"] = bf16_comparison(passes["te"], passes["local"], passes["fp32"])
        results[f"moe_te_vs_local_{kind}"]["load_balancing_loss"] = passes["te"]["metrics"]["load_balancing_loss"]
    return results


def single() -> dict:
    """Every one-GPU case, each in its own parallel state."""
    from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed

    info = probe()
    capability = tuple(info["capability"])
    results = {}
    runs = [("local", train, "local", False)]
    if info["te"] is None:
        runs += [("te", train, "transformer_engine", False)]
        if capability >= (8, 9):
            runs += [("fp8", train, "transformer_engine", True)]
    for name, fn, *args in runs:
        initialize_distributed(ParallelLayout(), seed=1234)
        try:
            _guarded(results, name, fn, *args)
        finally:
            destroy_distributed()
    if info["te"] is None:
        initialize_distributed(ParallelLayout(), seed=1234)
        try:
            results.update(te_against_local(capability))
        except Exception:  # noqa: BLE001 - every equivalence case reports it
            results["all"] = {"error": traceback.format_exc()}
        finally:
            destroy_distributed()
        initialize_distributed(ParallelLayout(), seed=1234)
        try:
            results.update(moe_te_against_local())
        except Exception:  # noqa: BLE001 - every MoE case reports it
            results["moe_te_vs_local_padded"] = results["moe_te_vs_local_packed"] = {"error": traceback.format_exc()}
        finally:
            destroy_distributed()
    return results


# ------------------------------------------------------------------ two GPUs


def _sp_worker() -> dict:
    """TP=2: TE layers with the chunked head, with sequence parallelism against without."""
    from simpo_megatron.runtime import initialize_distributed

    chunked = dict(tensor_model_parallel_size=2, logprob_chunk_size=32)
    cfgs = {
        "sp": _config("transformer_engine", sequence_parallel=True, **chunked),
        "no_sp": _config("transformer_engine", **chunked),
        "fp32": _config("local", bf16=False, **chunked),
    }
    initialize_distributed(cfgs["sp"].parallel_layout(), seed=1234)
    states = _models("no_sp", 2, **cfgs)
    batches = global_batch(cfgs["sp"])
    passes = {name: forward_backward(cfgs[name], states[name], batches) for name in cfgs}
    return {"chunked_head_sp": bf16_comparison(passes["sp"], passes["no_sp"], passes["fp32"])}


def _cp_worker() -> dict:
    """TE with CP=2 (DP=1) against TE with CP=1 (DP=2), padded and packed, on the same weights."""
    from megatron.core import parallel_state

    from simpo_megatron.runtime import initialize_distributed

    cp_cfg = _config("transformer_engine", context_parallel_size=2)
    initialize_distributed(cp_cfg.parallel_layout(), seed=1234)
    cp_state = _models("cp", 2, cp=cp_cfg)["cp"]
    weights = export_weights(cp_state)
    # DP=1: both CP ranks read the whole global batch; forward_step gives each its chunks.
    cp_passes = {
        kind: forward_backward(cp_cfg, cp_state, global_batch(cp_cfg.replace(packing=kind == "packed")))
        for kind in ("padded", "packed")
    }
    parallel_state.destroy_model_parallel()

    cfgs = {"te": _config("transformer_engine"), "fp32": _config("local", bf16=False)}
    initialize_distributed(cfgs["te"].parallel_layout(), seed=1234)
    states = _models("te", 2, **cfgs)
    for state in states.values():
        load_weights(state, weights)
    dp_rank = parallel_state.get_data_parallel_rank()
    results = {}
    for kind in ("padded", "packed"):
        batches = global_batch(cfgs["te"].replace(packing=kind == "packed"), dp_rank, 2)
        passes = {name: forward_backward(cfgs[name], states[name], batches) for name in cfgs}
        results[f"cp2_{kind}"] = bf16_comparison(cp_passes[kind], passes["te"], passes["fp32"])
    return results


def _on_two_gpus(worker) -> dict:
    """``worker`` on two processes (one GPU each); the case's result with every rank's figures
    combined (the largest difference and the smallest bound)."""
    from simpo_megatron.testing import run_distributed

    try:
        per_rank = run_distributed(worker, 2, timeout=500)
    except Exception:  # noqa: BLE001 - reported to the test
        return {"all": {"error": traceback.format_exc()}}
    results = {}
    for name in per_rank[0]:
        first = per_rank[0][name]
        results[name] = {
            **first,
            "diff": {k: max(r[name]["diff"][k] for r in per_rank) for k in first["diff"]},
            "bound": {k: min(r[name]["bound"][k] for r in per_rank) for k in first["bound"]},
        }
    return results


CASES = {
    "probe": probe,
    "single": single,
    "sp": lambda: _on_two_gpus(_sp_worker),
    "cp": lambda: _on_two_gpus(_cp_worker),
}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]]()), flush=True)
