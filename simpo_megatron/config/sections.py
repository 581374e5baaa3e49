"""The sections of a run's configuration, and the run's ``SimPOConfig`` that holds them.

One frozen dataclass per concern: ``model`` (architecture and numerics), ``parallel``,
``data`` (batches, sequences, datasets, tokenizer), ``loss`` (the SimPO knobs), ``optimizer``
(optimizer, schedule, iterations), ``checkpoint``, ``logging`` (logging and evaluation) and
``memory`` (the memory budget).
Every field is a command-line flag named as in Megatron-LM (``hidden_size`` is
``--hidden-size``); its metadata holds the help text and, for a closed set of values, the
choices: a tuple, or a function that reads them from the module that owns them (the loss
registry, the tokenizer types) when the parser is built or the config validated. The flags
and the YAML file are read in ``loader``; the rules the settings obey are in ``validation``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simpo_megatron.mathutil import ceil_div, round_up


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + name.replace("_", "-")


Choices = Sequence[Any] | Callable[[], Sequence[Any]]


def _opt(default: Any, help: str, choices: Choices | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list_opt(help: str):
    return field(default_factory=list, metadata={"help": help, "choices": None})


def field_choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values a setting may take (None among them: it may be unset), or None for any."""
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


# Choices defined by the modules that use them, read when asked for (a loss registered in
# losses.py is a --loss-type choice without an edit here).
def _loss_types() -> tuple[str, ...]:
    from simpo_megatron import losses

    return tuple(losses.LOSS_TYPES)


def _tokenizer_types() -> tuple[str | None, ...]:
    from simpo_megatron.data.tokenizers import TOKENIZER_TYPES

    return (None, *TOKENIZER_TYPES)


@dataclass(frozen=True)
class ModelConfig:
    """The model: a Llama-family decoder, its numerics, and the layer implementation."""

    num_layers: int = _opt(4, "Number of transformer layers.")
    hidden_size: int = _opt(256, "Transformer hidden size.")
    ffn_hidden_size: int | None = _opt(None, "MLP hidden size (default: about 8/3 hidden, x64).")
    num_attention_heads: int = _opt(8, "Number of attention heads.")
    num_query_groups: int | None = _opt(None, "Key/value groups for grouped-query attention (default: heads).")
    kv_channels: int | None = _opt(None, "Head dimension (default: hidden / heads).")
    vocab_size: int | None = _opt(None, "Vocabulary size (default: the tokenizer's).")
    make_vocab_size_divisible_by: int = _opt(128, "Pad the vocabulary to a multiple of this x TP.")
    max_position_embeddings: int | None = _opt(None, "Maximum positions (default: --seq-length).")
    normalization: str = _opt("RMSNorm", "Normalization layer.", ("RMSNorm", "LayerNorm"))
    norm_epsilon: float = _opt(1e-5, "Epsilon of the normalization layers.")
    swiglu: bool = _opt(True, "SwiGLU MLP (Llama); --no-swiglu for GELU.")
    geglu: bool = _opt(False, "GeGLU MLP with the tanh GELU (Gemma-2); needs --no-swiglu.")
    apply_layernorm_1p: bool = _opt(False, "Norms scale by (1 + weight), weights stored centred on 0 (Gemma).")
    sandwich_norm: bool = _opt(False, "Also norm the attention and MLP outputs before the residual add (Gemma-2).")
    scale_embeddings: bool = _opt(False, "Multiply the embeddings by sqrt(hidden size), in their dtype (Gemma).")
    softmax_scale: float | None = _opt(
        None, "Attention logit scale (default: 1/sqrt(head dim); Gemma-2: query_pre_attn_scalar^-0.5)."
    )
    attn_logit_softcapping: float | None = _opt(None, "Soft-cap attention logits to cap*tanh(x/cap) (Gemma-2: 50).")
    final_logit_softcapping: float | None = _opt(None, "Soft-cap the output logits to cap*tanh(x/cap) (Gemma-2: 30).")
    sliding_window: int | None = _opt(
        None, "Sliding-window attention: each token sees this many tokens, itself included (HF's sliding_window)."
    )
    window_attn_skip_freq: int | None = _opt(
        None, "With --sliding-window, every N-th layer attends fully (Gemma-2: 2; default: none)."
    )
    rotary_base: int = _opt(10000, "RoPE theta.")
    rotary_percent: float = _opt(1.0, "Fraction of the head dimension that RoPE rotates.")
    use_rope_scaling: bool = _opt(False, "Llama-3.1 RoPE frequency scaling.")
    rope_scaling_factor: float = _opt(8.0, "Llama-3.1 RoPE scaling factor.")
    untie_embeddings_and_output_weights: bool = _opt(True, "Separate input embedding and output layer.")
    add_qkv_bias: bool = _opt(False, "Bias on the QKV projection (Qwen2).")
    qk_layernorm: bool = _opt(False, "RMSNorm on each query and key head before RoPE (Qwen3).")
    num_experts: int | None = _opt(None, "Mixture of experts: routed experts per layer (default: a dense MLP).")
    moe_ffn_hidden_size: int | None = _opt(None, "Hidden size of each expert's MLP (default: --ffn-hidden-size).")
    moe_router_topk: int = _opt(2, "Experts each token is routed to.")
    moe_router_pre_softmax: bool = _opt(
        False,
        "Route by the softmax over all experts and keep the top-k probabilities as they are "
        "(Qwen3-MoE norm_topk_prob=false); default: the softmax of the top-k logits, i.e. "
        "renormalized (Mixtral, Qwen3-MoE norm_topk_prob=true).",
    )
    moe_aux_loss_coeff: float | None = _opt(
        None,
        "Weight of the router load-balancing loss added to the preference loss (HF's router_aux_loss_coef). "
        "Default: a --load HF model's router_aux_loss_coef when its output_router_logits is true, else 0.",
    )
    freeze_router: bool = _opt(False, "Do not train the MoE routers (their weights keep their loaded values).")
    init_method_std: float = _opt(0.02, "Standard deviation of the weight initialization.")
    hidden_dropout: float = _opt(0.0, "Dropout on hidden states.")
    attention_dropout: float = _opt(0.0, "Dropout on attention probabilities.")
    transformer_impl: str = _opt(
        "local",
        "Layer implementation: megatron-core local layers or Transformer Engine.",
        ("local", "transformer_engine"),
    )
    bf16: bool = _opt(False, "bf16 parameters and compute (GPU).")
    fp16: bool = _opt(False, "fp16 parameters and compute with dynamic loss scaling (GPU).")
    fp8_format: str | None = _opt(None, "FP8 format; enables FP8.", (None, "e4m3", "hybrid"))
    fp8_recipe: str = _opt("delayed", "FP8 scaling recipe.", ("delayed", "tensorwise", "mxfp8", "blockwise"))
    fp8_margin: int = _opt(0, "FP8 scaling margin.")
    fp8_amax_history_len: int = _opt(1, "FP8 amax history length (delayed scaling).")
    fp8_amax_compute_algo: str = _opt("most_recent", "FP8 amax reduction over the history.", ("max", "most_recent"))
    fp8_param_gather: bool = _opt(False, "Keep parameters in FP8 and all-gather them in FP8.")
    logprob_chunk_size: int = _opt(
        0,
        "The last stage returns its hidden states and the loss computes the log-prob head in "
        "chunks of this many tokens, so the full-vocabulary logits of a micro-batch never exist at "
        "once (0: off).",
    )
    recompute_granularity: str | None = _opt(
        None,
        "Activation recompute: 'full' keeps only each recomputed layer's input and reruns the layer "
        "in backward (needs --recompute-method); 'selective' reruns the --recompute-modules of every "
        "layer (default: none).",
        (None, "full", "selective"),
    )
    recompute_method: str | None = _opt(
        None,
        "Which layers full recompute covers: 'uniform' splits each model chunk's layers into groups "
        "of --recompute-num-layers and keeps one input per group; 'block' recomputes the first "
        "--recompute-num-layers layers of each model chunk and stores the rest.",
        (None, "uniform", "block"),
    )
    recompute_num_layers: int | None = _opt(
        None, "Layers per recompute group (uniform) or recomputed layers per model chunk (block)."
    )
    recompute_modules: list[str] = _list_opt(
        "Submodules that selective recompute reruns, megatron-core's names: core_attn, mlp, layernorm; "
        "moe with experts (default: core_attn)."
    )

    # Settings of how the model is trained or run, not of the function it computes.
    NOT_ARCHITECTURE = (
        "make_vocab_size_divisible_by",
        "init_method_std",
        "hidden_dropout",
        "attention_dropout",
        "transformer_impl",
        "bf16",
        "fp16",
        "fp8_format",
        "fp8_recipe",
        "fp8_margin",
        "fp8_amax_history_len",
        "fp8_amax_compute_algo",
        "fp8_param_gather",
        "logprob_chunk_size",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_modules",
        "moe_aux_loss_coeff",
        "freeze_router",
    )

    @classmethod
    def architecture_fields(cls) -> tuple[str, ...]:
        """The fields that describe the model's shape: what a checkpoint and an HF config record."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.NOT_ARCHITECTURE)

    def derived_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if not (self.swiglu or self.geglu):
            return 4 * self.hidden_size
        return ceil_div(8 * self.hidden_size, 3 * 64) * 64  # 8/3 x hidden, rounded up to x64


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and the batch are split over the world."""

    tensor_model_parallel_size: int = _opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(1, "Pipeline-parallel size.")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(
        None, "Layers per virtual pipeline stage (interleaved 1F1B)."
    )
    sequence_parallel: bool = _opt(
        False, "Sequence parallelism (needs TP > 1 and --transformer-impl transformer_engine)."
    )
    context_parallel_size: int = _opt(
        1,
        "Context-parallel size: every sequence is split over this many ranks (2N chunks, rank r "
        "holding chunks r and 2N-1-r, as megatron-core), to fit long sequences; --seq-length must "
        "be a multiple of 2N.",
    )
    cp_comm_type: str = _opt(
        "p2p",
        "How Transformer Engine's attention exchanges keys and values with "
        "--context-parallel-size > 1 (ring p2p, all-to-all over heads, or all-gather); the local "
        "layers always all-gather them.",
        ("p2p", "a2a", "allgather"),
    )
    expert_model_parallel_size: int = _opt(
        1,
        "Expert-parallel size: each MoE layer's experts are split over this many data-parallel "
        "(x context-parallel) ranks, tokens sent to their experts and back.",
    )
    use_distributed_optimizer: bool = _opt(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = _opt(False, "Overlap the data-parallel gradient reduce with backward.")
    overlap_param_gather: bool = _opt(False, "Overlap the distributed optimizer's parameter all-gather.")
    distributed_timeout_minutes: float = _opt(
        10.0,
        "How long a collective may wait for the other ranks before the run stops with an error naming "
        "the rank and what it was doing (a rank that hangs or died); fractions allowed.",
    )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


@dataclass(frozen=True)
class DataConfig:
    """Batches, sequences, the preprocessed datasets and their tokenizer."""

    micro_batch_size: int = _opt(4, "Preference pairs per micro-batch (2x sequences).")
    global_batch_size: int = _opt(8, "Preference pairs per optimizer step, over all data-parallel ranks.")
    seq_length: int = _opt(256, "Tokens per sequence (prompt + response).")
    max_prompt_length: int | None = _opt(
        None,
        "When prompt + the longer response exceed --seq-length, cut the prompt to at most this "
        "many tokens (its BOS and its last tokens), then the responses to the room left, as TRL and "
        "the SimPO recipes do. Without it the prompt yields only what is needed (down to its BOS). "
        "No response is ever left empty.",
    )
    pad_to_multiple_of: int = _opt(
        8, "Pad each micro-batch to its longest sequence rounded up to this multiple (0: always to --seq-length)."
    )
    packing: bool = _opt(
        False,
        "Pack the sequences of each global batch densely into rows of --seq-length "
        "(attention within each sequence only); a packed micro-batch holds at most "
        "2 x --micro-batch-size x --seq-length tokens.",
    )
    data_path: list[str] = _list_opt("Preprocessed prefixes, optionally weighted: 'A' or '0.7 A 0.3 B'.")
    valid_data_path: list[str] = _list_opt("Separate validation prefixes (instead of --split).")
    split: str = _opt("98,2,0", "Train/valid/test split of --data-path, in proportions.")
    tokenizer_type: str | None = _opt(None, "Tokenizer type.", _tokenizer_types)
    tokenizer_model: str | None = _opt(None, "Tokenizer model file or directory.")
    mock_data: bool = _opt(False, "Train on built-in synthetic preference pairs (no --data-path).")
    num_workers: int = _opt(0, "DataLoader worker processes.")


@dataclass(frozen=True)
class LossConfig:
    """The preference loss and its knobs (the SimPO repository's names); the one place they are defined."""

    beta: float = _opt(
        2.0, "Reward scale: SimPO's beta (reward = beta x average log-prob), DPO's beta, IPO's tau, ORPO's lambda."
    )
    gamma_beta_ratio: float = _opt(0.5, "SimPO target margin gamma/beta (as in the SimPO repository).")
    loss_type: str = _opt("sigmoid", "Preference loss.", _loss_types)
    label_smoothing: float = _opt(0.0, "Label smoothing, in [0, 0.5]: SimPO's sigmoid, and conservative DPO (dpo).")
    rdpo_alpha: float = _opt(
        0.0,
        "R-DPO length margin: alpha x (|chosen| - |rejected|) added to beta x the DPO logits "
        "(--loss-type dpo only; 0 disables).",
    )
    sft_weight: float = _opt(0.0, "Weight of the SFT term on the chosen responses.")
    sft_loss_form: str = _opt(
        "token",
        "SFT term: 'token' is the cross-entropy averaged over all chosen-response tokens of "
        "the global batch (the SimPO repository and TRL's cpo_alpha take it per micro-batch); "
        "'pair' is -logp(chosen) per pair, averaged over pairs (length-normalized or summed, as "
        "--average-log-prob says).",
        ("token", "pair"),
    )
    sft_on_prompt: bool = _opt(
        False,
        "The token-level SFT term covers the prompt tokens of each chosen sequence too, as TRL's "
        "ORPOTrainer takes its NLL over prompt + chosen (ORPO as TRL: --loss-type orpo --sft-weight 1 "
        "--sft-on-prompt).",
    )
    average_log_prob: bool = _opt(True, "Length-normalized log-probs (SimPO); --no-average-log-prob sums.")

    @property
    def token_sft(self) -> bool:
        """Whether the SFT term is the token-level mean (it needs the global chosen-token count)."""
        return self.sft_weight > 0 and self.sft_loss_form == "token"


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, the learning-rate schedule and how long to train."""

    optimizer: str = _opt("adam", "Optimizer.", ("adam", "sgd"))
    lr: float = _opt(1e-4, "Peak learning rate.")
    min_lr: float = _opt(0.0, "Learning rate at the end of the decay.")
    lr_decay_style: str = _opt("cosine", "Decay after warmup.", ("constant", "linear", "cosine"))
    lr_decay_iters: int | None = _opt(None, "Iterations of decay (default: --train-iters).")
    lr_warmup_iters: int = _opt(0, "Linear warmup iterations.")
    lr_warmup_fraction: float | None = _opt(
        None,
        "Warmup as a fraction of the decay iterations, rounded up: ceil(fraction x iterations), "
        "as Hugging Face's warmup_ratio.",
    )
    weight_decay: float = _opt(0.0, "Decoupled weight decay.")
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.95, "Adam beta2.")
    adam_eps: float = _opt(1e-8, "Adam epsilon.")
    sgd_momentum: float = _opt(0.0, "SGD momentum.")
    clip_grad: float = _opt(1.0, "Clip the global gradient norm to this (0 disables).")
    initial_loss_scale: float = _opt(2.0**16, "Initial dynamic loss scale for --fp16.")
    train_iters: int = _opt(100, "Optimizer steps to train for.")
    max_skipped_iters: int = _opt(10, "Stop after this many consecutive non-finite updates.")
    seed: int = _opt(1234, "Random seed.")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go and what a load restores."""

    save: str | None = _opt(None, "Directory to save checkpoints to.")
    load: str | None = _opt(None, "Directory (or HF model directory) to load from.")
    save_interval: int | None = _opt(None, "Save every this many iterations.")
    async_save: bool = _opt(
        False,
        "Write checkpoints in a background process while training goes on; a checkpoint counts (the "
        "tracker names it) only once every rank's write is complete.",
    )
    no_load_optim: bool = _opt(False, "Do not load optimizer state.")
    no_load_rng: bool = _opt(False, "Do not load RNG state.")
    finetune: bool = _opt(False, "Load weights only and start at iteration 0.")
    ref_load: str | None = _opt(
        None,
        "Reference model of a reference-based --loss-type (an HF directory or a checkpoint directory); "
        "default: the weights --load starts from.",
    )
    ref_scores_dir: str | None = _opt(
        None,
        "Where the reference model's scores of each dataset are kept (computed once, reused while the "
        "data, the reference and the truncation are the same); default: beside each --data-path prefix.",
    )
    dist_ckpt_optim_fully_reshardable: bool = _opt(
        False,
        "Save distributed-optimizer state so that it loads on any TP/PP/DP layout "
        "(gathers it at save time); by default it reshards over data-parallel ranks only.",
    )
    keep_last_checkpoints: int | None = _opt(
        None,
        "Keep only the newest this many checkpoints in --save, deleting older ones once a new one "
        "is complete (default: keep all).",
    )
    keep_checkpoint_every: int | None = _opt(
        None, "With --keep-last-checkpoints, also keep the checkpoints of every this many iterations."
    )
    exit_interval: int | None = _opt(None, "Save and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: float | None = _opt(
        None, "Save and exit once this many minutes have passed since the run started (set-up included)."
    )
    exit_signal_handler: bool = _opt(
        True,
        "On SIGTERM or SIGINT, save at the end of the current iteration and exit; "
        "--no-exit-signal-handler leaves the signals' default action (the process ends at once).",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Console, metrics, TensorBoard and Weights & Biases output, and evaluation on the validation data."""

    log_interval: int = _opt(10, "Print metrics every this many iterations (averaged over them, as Megatron-LM).")
    health_check_window: int = _opt(
        5,
        "Warn (console and metrics file) when the reward margin stays below 0.5 or above 5.0, or "
        "the mean log-probs below -10 or above 0 (signs of a diverging SimPO run), for this many "
        "log intervals in a row; once per episode. 0 disables.",
    )
    tensorboard_dir: str | None = _opt(None, "Write TensorBoard events here.")
    metrics_file: str | None = _opt(None, "Metrics JSONL (default: SAVE/metrics.jsonl when --save is set).")
    wandb_project: str | None = _opt(
        None, "Log the metrics and the config to this Weights & Biases project (needs the wandb extra)."
    )
    wandb_exp_name: str | None = _opt(None, "The W&B run's name (default: one W&B makes up).")
    wandb_save_dir: str | None = _opt(
        None, "Where W&B keeps its local files (default: SAVE/wandb with --save, else $WANDB_DIR or ./wandb)."
    )
    eval_interval: int | None = _opt(None, "Evaluate every this many iterations.")
    eval_iters: int = _opt(
        10,
        "Global batches per evaluation (the same pairs each time, a partial last batch "
        "included); -1 scores every validation pair exactly once, as the SimPO recipes evaluate.",
    )
    eval_only: bool = _opt(False, "Evaluate the loaded checkpoint and exit.")


@dataclass(frozen=True)
class MemoryConfig:
    """The per-GPU memory budget the start-up memory estimate is checked against."""

    gpu_memory_gb: float | None = _opt(
        None,
        "GPU memory per rank in GB (GiB); when the memory estimate exceeds 90%% of it, warn before the "
        "first step, naming the flags that would make the run fit (default: the CUDA device's memory).",
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "memory": MemoryConfig,
}


@functools.cache
def section_of() -> dict[str, str]:
    """Field name -> the name of the section that holds it (names are unique across sections)."""
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise TypeError(f"field {f.name!r} is in sections {owner[f.name]!r} and {section!r}")
            owner[f.name] = section
    return owner


@dataclass(frozen=True)
class SimPOConfig:
    """All settings of a run, by section. ``cfg.model.hidden_size`` is the flag ``--hidden-size``.

    Frozen: ``replace`` returns a changed copy.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, **kwargs: Any) -> SimPOConfig:
        """A config from flat settings (flag names with underscores), the rest defaults."""
        return cls().replace(**{**(values or {}), **kwargs})

    def replace(self, **values: Any) -> SimPOConfig:
        """A copy with the given flat settings changed."""
        owner = section_of()
        unknown = sorted(set(values) - set(owner))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            changes.setdefault(owner[name], {})[name] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v) for s, v in changes.items()})

    def to_flat(self) -> dict[str, Any]:
        """Every setting by its flat name (what checkpoints record)."""
        return {k: v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    def validate(self, world_size: int) -> SimPOConfig:
        """Check every setting, and the sections against each other and ``world_size``
        (``validation.validate``); returns self, or raises ConfigError naming the flags."""
        from simpo_megatron.config.validation import validate

        return validate(self, world_size)

    # ---------------------------------------------------------------- derived values
    def padded_vocab_size(self, world_tp: int | None = None) -> int:
        """The vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (Megatron)."""
        tp = world_tp or self.parallel.tensor_model_parallel_size
        return round_up(self.model.vocab_size, self.model.make_vocab_size_divisible_by * tp)

    def data_parallel_size(self, world_size: int) -> int:
        return self.parallel.data_parallel_size(world_size)

    def num_micro_batches(self, world_size: int) -> int:
        return self.data.global_batch_size // (self.data.micro_batch_size * self.data_parallel_size(world_size))

    def parallel_layout(self):
        """The runtime's ParallelLayout of this run (what the model is built and split for)."""
        from simpo_megatron.runtime import ParallelLayout

        par = self.parallel
        return ParallelLayout(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size(),
            context_parallel_size=par.context_parallel_size,
            sequence_parallel=par.sequence_parallel,
            cp_comm_type=par.cp_comm_type,
            expert_model_parallel_size=par.expert_model_parallel_size,
        )

    def virtual_pipeline_model_parallel_size(self) -> int | None:
        per_vstage = self.parallel.num_layers_per_virtual_pipeline_stage
        if per_vstage is None:
            return None
        return self.model.num_layers // (self.parallel.pipeline_model_parallel_size * per_vstage)
