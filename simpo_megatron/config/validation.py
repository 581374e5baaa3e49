"""The rules a run's settings obey, checked once at start, before any work.

``validate(cfg, world_size)`` checks every setting against its choices, each section on its
own, then the sections against each other and the world size, and raises ConfigError with a
message that names the flags. Every configuration rule is here, those about what the layer
implementations support included: the model builder and the training loop take a validated
config. (Checks that need the data, such as the tokenizer's vocabulary or the number of
pairs, run where the data is read.)
"""

from __future__ import annotations

import dataclasses
import importlib.util

from simpo_megatron.config.sections import (
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    SimPOConfig,
    field_choices,
    flag,
)


def validate(cfg: SimPOConfig, world_size: int) -> SimPOConfig:
    """Check ``cfg`` for a run of ``world_size`` processes; returns ``cfg`` or raises ConfigError."""
    _check_choices(cfg)
    _check_model(cfg.model)
    _check_parallel(cfg.parallel)
    validate_data(cfg.data)
    _check_loss(cfg.loss)
    _check_optimizer(cfg.optimizer)
    _check_checkpoint(cfg.checkpoint)
    _check_logging(cfg.logging)
    if cfg.memory.gpu_memory_gb is not None and cfg.memory.gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory-gb must be > 0, got {cfg.memory.gpu_memory_gb}")
    _check_layout(cfg, world_size)
    _check_recompute(cfg)
    _check_features(cfg)
    return cfg


def _require_positive(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(section, name)}")


def _check_choices(cfg: SimPOConfig) -> None:
    """Values outside a flag's choices (argparse checks the command line; this, a YAML file too)."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            choices = field_choices(f)
            value = getattr(values, f.name)
            if choices is not None and value not in choices:
                named = ", ".join(str(c) for c in choices if c is not None)
                raise ConfigError(f"{flag(f.name)} must be one of {named}, got {value!r}")


# ------------------------------------------------------------------ one section at a time


def _check_model(model: ModelConfig) -> None:
    _require_positive(model, "num_layers", "hidden_size", "num_attention_heads")
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % groups != 0:
        raise ConfigError(
            f"--num-attention-heads ({model.num_attention_heads}) is not divisible by --num-query-groups ({groups})"
        )
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads != 0:
        raise ConfigError(
            f"--hidden-size ({model.hidden_size}) is not divisible by --num-attention-heads "
            f"({model.num_attention_heads}); set --kv-channels"
        )
    if model.bf16 and model.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if model.logprob_chunk_size < 0:
        raise ConfigError(f"--logprob-chunk-size must be >= 0, got {model.logprob_chunk_size}")
    if model.geglu and model.swiglu:
        raise ConfigError("--geglu and --swiglu are mutually exclusive (pass --no-swiglu)")
    for name in (
        "softmax_scale",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
        "window_attn_skip_freq",
    ):
        if getattr(model, name) is not None and getattr(model, name) <= 0:
            raise ConfigError(f"{flag(name)} must be > 0, got {getattr(model, name)}")
    if model.transformer_impl == "transformer_engine":
        for name in ("attn_logit_softcapping", "sandwich_norm"):
            if getattr(model, name):
                raise ConfigError(
                    f"{flag(name)} (Gemma-2) needs --transformer-impl local: megatron-core 0.16.1's "
                    "Transformer Engine layers have no attention logit soft-capping and no post-norms"
                )
    if model.window_attn_skip_freq is not None and model.sliding_window is None:
        raise ConfigError("--window-attn-skip-freq needs --sliding-window")
    if model.fp8_format is not None and model.transformer_impl != "transformer_engine":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine")
    if model.fp8_param_gather and model.fp8_format is None:
        raise ConfigError("--fp8-param-gather needs --fp8-format")
    if model.num_experts is not None:
        _require_positive(model, "num_experts", "moe_router_topk")
        if model.moe_router_topk > model.num_experts:
            raise ConfigError(
                f"--moe-router-topk ({model.moe_router_topk}) exceeds --num-experts ({model.num_experts})"
            )
        if (model.moe_aux_loss_coeff or 0.0) < 0:
            raise ConfigError(f"--moe-aux-loss-coeff must be >= 0, got {model.moe_aux_loss_coeff}")
        if model.moe_router_topk == 1 and not model.moe_router_pre_softmax:
            # Renormalizing one probability would make every weight 1 (megatron-core refuses it too).
            raise ConfigError("--moe-router-topk 1 needs --moe-router-pre-softmax")
    elif model.freeze_router or model.moe_ffn_hidden_size is not None or model.moe_aux_loss_coeff:
        raise ConfigError("--freeze-router, --moe-ffn-hidden-size and --moe-aux-loss-coeff need --num-experts")


def _check_parallel(par: ParallelConfig) -> None:
    _require_positive(
        par,
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "expert_model_parallel_size",
    )
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if par.num_layers_per_virtual_pipeline_stage is not None and par.pipeline_model_parallel_size < 2:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if not par.distributed_timeout_minutes > 0:
        raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {par.distributed_timeout_minutes}")


def validate_data(data: DataConfig) -> None:
    """The data section alone: what must hold before the tokenizer and datasets are read."""
    _require_positive(data, "micro_batch_size", "global_batch_size", "seq_length")
    if data.pad_to_multiple_of < 0:
        raise ConfigError(f"--pad-to-multiple-of must be >= 0, got {data.pad_to_multiple_of}")
    if data.seq_length < 2:
        raise ConfigError("--seq-length must be >= 2 (a prompt token and a response token)")
    if data.max_prompt_length is not None and not 1 <= data.max_prompt_length < data.seq_length:
        raise ConfigError(f"--max-prompt-length ({data.max_prompt_length}) must be in [1, --seq-length)")
    if data.mock_data == bool(data.data_path):
        raise ConfigError("give exactly one of --data-path and --mock-data")
    if data.data_path and not data.tokenizer_model:
        raise ConfigError("--data-path needs --tokenizer-type and --tokenizer-model")


def _check_loss(loss: LossConfig) -> None:
    from simpo_megatron.losses import KNOBS, check_loss_args

    try:
        check_loss_args(loss.loss_type, name=flag, **{k: getattr(loss, k) for k in KNOBS})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if loss.sft_on_prompt and not loss.token_sft:
        raise ConfigError(
            "--sft-on-prompt extends the token-level SFT term: it needs --sft-weight > 0 and "
            f"--sft-loss-form token, got --sft-weight {loss.sft_weight} --sft-loss-form {loss.sft_loss_form}"
        )


def _check_optimizer(opt: OptimizerConfig) -> None:
    _require_positive(opt, "train_iters")
    if opt.lr_warmup_fraction is not None and opt.lr_warmup_iters:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if opt.lr_warmup_fraction is not None and not 0.0 <= opt.lr_warmup_fraction <= 1.0:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {opt.lr_warmup_fraction}")
    if opt.min_lr > opt.lr:
        raise ConfigError(f"--min-lr ({opt.min_lr}) exceeds --lr ({opt.lr})")
    if opt.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0, got {opt.clip_grad}")


def _check_checkpoint(ckpt: CheckpointConfig) -> None:
    if ckpt.async_save and not ckpt.save:
        raise ConfigError("--async-save needs --save")
    if ckpt.save_interval is not None and ckpt.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1, got {ckpt.save_interval}")
    for name in ("keep_last_checkpoints", "keep_checkpoint_every", "exit_interval"):
        value = getattr(ckpt, name)
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
    if ckpt.exit_duration_in_mins is not None and ckpt.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0, got {ckpt.exit_duration_in_mins}")
    if ckpt.keep_checkpoint_every is not None and ckpt.keep_last_checkpoints is None:
        raise ConfigError("--keep-checkpoint-every needs --keep-last-checkpoints (without it every checkpoint is kept)")
    if ckpt.keep_last_checkpoints is not None and not ckpt.save:
        raise ConfigError("--keep-last-checkpoints needs --save")


def _check_logging(log: LoggingConfig) -> None:
    _require_positive(log, "log_interval")
    if log.health_check_window < 0:
        raise ConfigError(f"--health-check-window must be >= 0, got {log.health_check_window}")
    if log.eval_iters < 1 and log.eval_iters != -1:
        raise ConfigError(f"--eval-iters must be >= 1, or -1 for the whole validation set; got {log.eval_iters}")
    if log.wandb_project is None:
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(log, name) is not None:
                raise ConfigError(f"{flag(name)} needs --wandb-project (W&B logging is on only with a project)")
    elif importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--wandb-project needs the wandb package, which is not installed: pip install 'simpo-megatron[wandb]'"
        )


# ------------------------------------------------------------------ sections together


def _check_layout(cfg: SimPOConfig, world_size: int) -> None:
    """The model and the batch against the parallel sizes and the world size."""
    model, par, data = cfg.model, cfg.parallel, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    cp = par.context_parallel_size
    if world_size % par.model_parallel_size != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
            f"x --pipeline-model-parallel-size ({pp})" + (f" x --context-parallel-size ({cp})" if cp > 1 else "")
        )
    if model.num_attention_heads % tp != 0:
        raise ConfigError(
            f"--num-attention-heads ({model.num_attention_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    groups = model.num_query_groups or model.num_attention_heads
    if groups % tp != 0:
        raise ConfigError(f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})")
    if model.num_layers % pp != 0:
        raise ConfigError(
            f"--num-layers ({model.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})"
        )
    per_vstage = par.num_layers_per_virtual_pipeline_stage
    if per_vstage is not None and (model.num_layers // pp) % per_vstage != 0:
        raise ConfigError(
            f"layers per pipeline stage ({model.num_layers // pp}) is not divisible by "
            f"--num-layers-per-virtual-pipeline-stage ({per_vstage})"
        )
    ep = par.expert_model_parallel_size
    if ep > 1 and model.num_experts is None:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    if model.num_experts is not None and model.num_experts % ep != 0:
        raise ConfigError(
            f"--num-experts ({model.num_experts}) is not divisible by --expert-model-parallel-size ({ep})"
        )
    if (world_size // par.model_parallel_size * cp) % ep != 0:
        raise ConfigError(
            f"--expert-model-parallel-size ({ep}) must divide data-parallel size x --context-parallel-size "
            f"({world_size // par.model_parallel_size * cp}): expert-parallel ranks are taken from those"
        )
    dp = cfg.data_parallel_size(world_size)
    if data.global_batch_size % (data.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size ({data.global_batch_size}) is not divisible by "
            f"--micro-batch-size ({data.micro_batch_size}) x data-parallel size ({dp})"
        )
    if cfg.virtual_pipeline_model_parallel_size() is not None and cfg.num_micro_batches(world_size) % pp != 0:
        raise ConfigError(
            f"the interleaved schedule needs the number of micro-batches "
            f"({cfg.num_micro_batches(world_size)}) to be a multiple of --pipeline-model-parallel-size ({pp})"
        )
    if cp > 1 and data.seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"--seq-length ({data.seq_length}) must be divisible by 2 x --context-parallel-size "
            f"({2 * cp}): each sequence is split into that many equal chunks"
        )
    if par.sequence_parallel and (data.seq_length // cp) % tp != 0:
        raise ConfigError(
            f"--seq-length ({data.seq_length}) must be divisible by --tensor-model-parallel-size "
            f"({tp}) x --context-parallel-size ({cp}) with --sequence-parallel"
        )


# megatron-core's selective recompute modules; mla_up_proj is left out (no multi-latent attention here).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts")
_EXPERT_MODULES = ("moe", "moe_act", "shared_experts")


def _check_recompute(cfg: SimPOConfig) -> None:
    """Activation recompute as Megatron-LM accepts it, and what megatron-core's block needs."""
    model = cfg.model
    granularity, method, num_layers, modules = (
        model.recompute_granularity,
        model.recompute_method,
        model.recompute_num_layers,
        model.recompute_modules,
    )
    if granularity is None:
        for name in ("recompute_method", "recompute_num_layers"):
            if getattr(model, name) is not None:
                raise ConfigError(f"{flag(name)} needs --recompute-granularity full")
        if modules:
            raise ConfigError("--recompute-modules needs --recompute-granularity selective")
        return
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ConfigError(
                "--recompute-granularity selective recomputes the --recompute-modules of every layer: "
                "--recompute-method and --recompute-num-layers are for --recompute-granularity full"
            )
        unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
        if unknown:
            raise ConfigError(f"--recompute-modules must be among {', '.join(RECOMPUTE_MODULES)}, got {unknown}")
        if not getattr(model, "num_experts", None) and any(m in _EXPERT_MODULES for m in modules):
            raise ConfigError("--recompute-modules moe, moe_act and shared_experts need a mixture-of-experts model")
        if "moe_act" in modules:
            raise ConfigError(
                "--recompute-modules moe_act needs megatron-core's grouped-GEMM experts, which this model "
                "builder does not use (their per-expert weights are HF's layout): recompute moe instead"
            )
        if "layernorm" in modules and model.transformer_impl == "local":
            raise ConfigError(
                "--recompute-modules layernorm needs --transformer-impl transformer_engine: megatron-core "
                "0.16.1 recomputes the norms through Transformer Engine's FP8 state"
            )
        if model.fp8_format is not None and model.fp8_recipe == "delayed" and "layernorm" in modules:
            raise ConfigError("--recompute-modules layernorm does not support --fp8-recipe delayed (megatron-core)")
        return
    if modules:
        raise ConfigError("--recompute-modules is for --recompute-granularity selective")
    if method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
    if num_layers is None:
        raise ConfigError(f"--recompute-method {method} needs --recompute-num-layers")
    # Each model chunk (a pipeline stage, or a virtual one) is a transformer block of its own.
    per_chunk = cfg.parallel.num_layers_per_virtual_pipeline_stage or (
        model.num_layers // cfg.parallel.pipeline_model_parallel_size
    )
    if not 1 <= num_layers <= per_chunk:
        raise ConfigError(f"--recompute-num-layers ({num_layers}) must be in [1, layers per model chunk ({per_chunk})]")
    if method == "uniform" and per_chunk % num_layers != 0:
        raise ConfigError(
            f"--recompute-method uniform needs the layers per model chunk ({per_chunk}) to be divisible "
            f"by --recompute-num-layers ({num_layers})"
        )


def _check_features(cfg: SimPOConfig) -> None:
    """What the layer implementations, the optimizer and the losses support in combination."""
    from simpo_megatron.losses import get_loss

    model, par, data = cfg.model, cfg.parallel, cfg.data
    if get_loss(cfg.loss.loss_type).needs_reference:
        if data.mock_data:
            raise ConfigError(
                f"--loss-type {cfg.loss.loss_type} scores preprocessed data with a reference model: use --data-path"
            )
        if not (cfg.checkpoint.load or cfg.checkpoint.ref_load):
            raise ConfigError(
                f"--loss-type {cfg.loss.loss_type} needs a reference model: --load (an HF directory or a "
                "checkpoint, whose weights are the reference) or --ref-load"
            )
    tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
    if cp > 1 and model.transformer_impl == "local" and (model.attn_logit_softcapping or model.sliding_window):
        raise ConfigError(
            "--context-parallel-size > 1 on the local layers supports neither --attn-logit-softcapping "
            "nor --sliding-window yet"
        )
    te_allgather = model.transformer_impl == "transformer_engine" and par.cp_comm_type == "allgather"
    if cp > 1 and data.packing and te_allgather:
        raise ConfigError(
            "--cp-comm-type allgather does not support packed sequences (--packing, THD) in Transformer "
            "Engine: use p2p or a2a"
        )
    if cp > 1 and par.cp_comm_type == "a2a" and (model.num_attention_heads // tp) % cp != 0:
        raise ConfigError(
            f"--cp-comm-type a2a needs the attention heads per tensor-parallel rank "
            f"({model.num_attention_heads // tp}) to be divisible by --context-parallel-size ({cp})"
        )
    if par.sequence_parallel and model.transformer_impl == "local" and model.normalization != "RMSNorm":
        raise ConfigError(
            "--sequence-parallel on --transformer-impl local needs --normalization RMSNorm: megatron-core's "
            "torch LayerNorm fallback (no Apex) does not support it"
        )
    if model.num_experts is not None and tp > 1 and not par.sequence_parallel:
        raise ConfigError(
            "a mixture-of-experts model with --tensor-model-parallel-size > 1 needs --sequence-parallel "
            "(megatron-core's MoE layer refuses to train without it)"
        )
    if par.use_distributed_optimizer and cfg.optimizer.optimizer != "adam":
        raise ConfigError("--use-distributed-optimizer supports --optimizer adam only (megatron-core)")
    if cfg.logging.eval_only and not cfg.checkpoint.load:
        raise ConfigError("--eval-only needs --load")
