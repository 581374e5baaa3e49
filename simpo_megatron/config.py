"""The configuration of a SimPO run, in sections: Megatron-LM flag names, a YAML file, validation.

A run's ``SimPOConfig`` holds one section per concern: ``model`` (architecture and numerics),
``parallel``, ``data`` (batches, sequences, datasets, tokenizer), ``loss`` (the SimPO knobs),
``optimizer`` (optimizer, schedule, iterations), ``checkpoint`` and ``logging`` (logging and
evaluation). Every field of every section is a command-line flag named as in Megatron-LM
(``hidden_size`` is ``--hidden-size``); the SimPO knobs follow the SimPO repository (``--beta``,
``--gamma-beta-ratio``, ``--loss-type``, ``--label-smoothing``, ``--sft-weight``).
``--config FILE.yaml`` sets the same keys, flat or under a section's name; flags given on the
command line override it. Each section validates itself, and ``SimPOConfig.validate`` checks
the sections against each other and the world size, once, before any work, with messages that
name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _opt(default: Any, help: str, choices: Sequence[Any] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list_opt(help: str):
    return field(default_factory=list, metadata={"help": help, "choices": None})


def _require_positive(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(section, name)}")


# ==================================================================== sections
@dataclass
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
    softmax_scale: float | None = _opt(None, "Attention logit scale (default: 1/sqrt(head dim); Gemma-2: query_pre_attn_scalar^-0.5).")
    attn_logit_softcapping: float | None = _opt(None, "Soft-cap attention logits to cap*tanh(x/cap) (Gemma-2: 50).")
    final_logit_softcapping: float | None = _opt(None, "Soft-cap the output logits to cap*tanh(x/cap) (Gemma-2: 30).")
    sliding_window: int | None = _opt(None, "Sliding-window attention: each token sees this many tokens, itself included (HF's sliding_window).")
    window_attn_skip_freq: int | None = _opt(None, "With --sliding-window, every N-th layer attends fully (Gemma-2: 2; default: none).")
    rotary_base: int = _opt(10000, "RoPE theta.")
    rotary_percent: float = _opt(1.0, "Fraction of the head dimension that RoPE rotates.")
    use_rope_scaling: bool = _opt(False, "Llama-3.1 RoPE frequency scaling.")
    rope_scaling_factor: float = _opt(8.0, "Llama-3.1 RoPE scaling factor.")
    untie_embeddings_and_output_weights: bool = _opt(True, "Separate input embedding and output layer.")
    add_qkv_bias: bool = _opt(False, "Bias on the QKV projection (Qwen2).")
    init_method_std: float = _opt(0.02, "Standard deviation of the weight initialization.")
    hidden_dropout: float = _opt(0.0, "Dropout on hidden states.")
    attention_dropout: float = _opt(0.0, "Dropout on attention probabilities.")
    transformer_impl: str = _opt(
        "local", "Layer implementation: megatron-core local layers or Transformer Engine.",
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
        0, "The last stage returns its hidden states and the loss computes the log-prob head in "
        "chunks of this many tokens, so the full-vocabulary logits of a micro-batch never exist at "
        "once (0: off)."
    )

    # Settings of how the model is trained or run, not of the function it computes.
    NOT_ARCHITECTURE = (
        "make_vocab_size_divisible_by", "init_method_std", "hidden_dropout", "attention_dropout",
        "transformer_impl", "bf16", "fp16", "fp8_format", "fp8_recipe", "fp8_margin",
        "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param_gather", "logprob_chunk_size",
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
        return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)

    def validate(self) -> None:
        _require_positive(self, "num_layers", "hidden_size", "num_attention_heads")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups != 0:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) is not divisible by "
                f"--num-query-groups ({groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) is not divisible by --num-attention-heads "
                f"({self.num_attention_heads}); set --kv-channels"
            )
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are mutually exclusive")
        if self.logprob_chunk_size < 0:
            raise ConfigError(f"--logprob-chunk-size must be >= 0, got {self.logprob_chunk_size}")
        if self.geglu and self.swiglu:
            raise ConfigError("--geglu and --swiglu are mutually exclusive (pass --no-swiglu)")
        for name in ("softmax_scale", "attn_logit_softcapping", "final_logit_softcapping",
                     "sliding_window", "window_attn_skip_freq"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.transformer_impl == "transformer_engine":
            for name in ("attn_logit_softcapping", "sandwich_norm"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{_flag(name)} (Gemma-2) needs --transformer-impl local: megatron-core 0.16.1's "
                        "Transformer Engine layers have no attention logit soft-capping and no post-norms"
                    )
        if self.window_attn_skip_freq is not None and self.sliding_window is None:
            raise ConfigError("--window-attn-skip-freq needs --sliding-window")
        if self.fp8_format is not None and self.transformer_impl != "transformer_engine":
            raise ConfigError("--fp8-format needs --transformer-impl transformer_engine")
        if self.fp8_param_gather and self.fp8_format is None:
            raise ConfigError("--fp8-param-gather needs --fp8-format")


@dataclass
class ParallelConfig:
    """How the model and the batch are split over the world."""

    tensor_model_parallel_size: int = _opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(1, "Pipeline-parallel size.")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(None, "Layers per virtual pipeline stage (interleaved 1F1B).")
    sequence_parallel: bool = _opt(False, "Sequence parallelism (needs TP > 1 and Transformer Engine or Apex norms).")
    context_parallel_size: int = _opt(
        1, "Context-parallel size: every sequence is split over this many ranks (2N chunks, rank r "
        "holding chunks r and 2N-1-r, as megatron-core), to fit long sequences; --seq-length must "
        "be a multiple of 2N."
    )
    cp_comm_type: str = _opt(
        "p2p", "How Transformer Engine's attention exchanges keys and values with "
        "--context-parallel-size > 1 (ring p2p, all-to-all over heads, or all-gather); the local "
        "layers always all-gather them.", ("p2p", "a2a", "allgather"),
    )
    use_distributed_optimizer: bool = _opt(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = _opt(False, "Overlap the data-parallel gradient reduce with backward.")
    overlap_param_gather: bool = _opt(False, "Overlap the distributed optimizer's parameter all-gather.")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def validate(self) -> None:
        _require_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.num_layers_per_virtual_pipeline_stage is not None and self.pipeline_model_parallel_size < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")


@dataclass
class DataConfig:
    """Batches, sequences, the preprocessed datasets and their tokenizer."""

    micro_batch_size: int = _opt(4, "Preference pairs per micro-batch (2x sequences).")
    global_batch_size: int = _opt(8, "Preference pairs per optimizer step, over all data-parallel ranks.")
    seq_length: int = _opt(256, "Tokens per sequence (prompt + response).")
    max_prompt_length: int | None = _opt(
        None, "When prompt + the longer response exceed --seq-length, cut the prompt to at most this "
        "many tokens (its BOS and its last tokens), then the responses to the room left, as TRL and "
        "the SimPO recipes do. Without it the prompt yields only what is needed (down to its BOS). "
        "No response is ever left empty."
    )
    pad_to_multiple_of: int = _opt(
        8, "Pad each micro-batch to its longest sequence rounded up to this multiple "
        "(0: always to --seq-length)."
    )
    packing: bool = _opt(
        False, "Pack the sequences of each global batch densely into rows of --seq-length "
        "(attention within each sequence only); a packed micro-batch holds at most "
        "2 x --micro-batch-size x --seq-length tokens."
    )
    data_path: list[str] = _list_opt("Preprocessed prefixes, optionally weighted: 'A' or '0.7 A 0.3 B'.")
    valid_data_path: list[str] = _list_opt("Separate validation prefixes (instead of --split).")
    split: str = _opt("98,2,0", "Train/valid/test split of --data-path, in proportions.")
    tokenizer_type: str | None = _opt(None, "Tokenizer type.", (None, "SentencePieceTokenizer", "HuggingFaceTokenizer"))
    tokenizer_model: str | None = _opt(None, "Tokenizer model file or directory.")
    mock_data: bool = _opt(False, "Train on built-in synthetic preference pairs (no --data-path).")
    num_workers: int = _opt(0, "DataLoader worker processes.")

    def validate(self) -> None:
        _require_positive(self, "micro_batch_size", "global_batch_size", "seq_length")
        if self.pad_to_multiple_of < 0:
            raise ConfigError(f"--pad-to-multiple-of must be >= 0, got {self.pad_to_multiple_of}")
        if self.seq_length < 2:
            raise ConfigError("--seq-length must be >= 2 (a prompt token and a response token)")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.seq_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be in [1, --seq-length)")
        if self.mock_data == bool(self.data_path):
            raise ConfigError("give exactly one of --data-path and --mock-data")
        if self.data_path and not self.tokenizer_model:
            raise ConfigError("--data-path needs --tokenizer-type and --tokenizer-model")


@dataclass
class LossConfig:
    """The preference loss and its knobs (the SimPO repository's names); the one place they are defined."""

    loss: str = _opt("simpo", "Preference loss, by registry name.")
    beta: float = _opt(2.0, "SimPO beta: scale of the reward (beta * average log-prob).")
    gamma_beta_ratio: float = _opt(0.5, "SimPO target margin gamma/beta (as in the SimPO repository).")
    loss_type: str = _opt("sigmoid", "SimPO loss type.", ("sigmoid", "hinge"))
    label_smoothing: float = _opt(0.0, "Label smoothing of the sigmoid loss, in [0, 0.5].")
    sft_weight: float = _opt(0.0, "Weight of the SFT term on the chosen responses.")
    sft_loss_form: str = _opt(
        "token", "SFT term: 'token' is the cross-entropy averaged over all chosen-response tokens of "
        "the global batch (the SimPO repository and TRL's cpo_alpha take it per micro-batch); "
        "'pair' is the spec's "
        "-logp(chosen) per pair, averaged over pairs (length-normalized or summed, as "
        "--average-log-prob says).", ("token", "pair"),
    )
    average_log_prob: bool = _opt(True, "Length-normalized log-probs (SimPO); --no-average-log-prob sums.")

    @property
    def token_sft(self) -> bool:
        """Whether the SFT term is the token-level mean (it needs the global chosen-token count)."""
        return self.sft_weight > 0 and self.sft_loss_form == "token"

    def validate(self) -> None:
        from simpo_megatron.losses import check_simpo_args, get_loss

        try:
            get_loss(self.loss)
            check_simpo_args(self.beta, self.loss_type, self.label_smoothing, self.sft_weight, name=_flag)
        except ValueError as e:
            message = str(e)
            raise ConfigError(message if message.startswith("--") else f"--loss: {message}") from None


@dataclass
class OptimizerConfig:
    """The optimizer, the learning-rate schedule and how long to train."""

    optimizer: str = _opt("adam", "Optimizer.", ("adam", "sgd"))
    lr: float = _opt(1e-4, "Peak learning rate.")
    min_lr: float = _opt(0.0, "Learning rate at the end of the decay.")
    lr_decay_style: str = _opt("cosine", "Decay after warmup.", ("constant", "linear", "cosine"))
    lr_decay_iters: int | None = _opt(None, "Iterations of decay (default: --train-iters).")
    lr_warmup_iters: int = _opt(0, "Linear warmup iterations.")
    lr_warmup_fraction: float | None = _opt(
        None, "Warmup as a fraction of the decay iterations, rounded up: ceil(fraction x iterations), "
        "as Hugging Face's warmup_ratio."
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

    def validate(self) -> None:
        _require_positive(self, "train_iters")
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) exceeds --lr ({self.lr})")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0, got {self.clip_grad}")


@dataclass
class CheckpointConfig:
    """Where checkpoints go and what a load restores."""

    save: str | None = _opt(None, "Directory to save checkpoints to.")
    load: str | None = _opt(None, "Directory (or HF model directory) to load from.")
    save_interval: int | None = _opt(None, "Save every this many iterations.")
    no_load_optim: bool = _opt(False, "Do not load optimizer state.")
    no_load_rng: bool = _opt(False, "Do not load RNG state.")
    finetune: bool = _opt(False, "Load weights only and start at iteration 0.")
    dist_ckpt_optim_fully_reshardable: bool = _opt(
        False, "Save distributed-optimizer state so that it loads on any TP/PP/DP layout "
        "(gathers it at save time); by default it reshards over data-parallel ranks only."
    )

    def validate(self) -> None:
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--save-interval must be >= 1, got {self.save_interval}")


@dataclass
class LoggingConfig:
    """Console, metrics and TensorBoard output, and evaluation on the validation data."""

    log_interval: int = _opt(10, "Print metrics every this many iterations (averaged over them, as Megatron-LM).")
    health_check_window: int = _opt(
        5, "Warn (console and metrics file) when the reward margin stays below 0.5 or above 5.0, or "
        "the mean log-probs below -10 or above 0 (the spec's Debugging checks), for this many "
        "log intervals in a row; once per episode. 0 disables."
    )
    tensorboard_dir: str | None = _opt(None, "Write TensorBoard events here.")
    metrics_file: str | None = _opt(None, "Metrics JSONL (default: SAVE/metrics.jsonl when --save is set).")
    eval_interval: int | None = _opt(None, "Evaluate every this many iterations.")
    eval_iters: int = _opt(
        10, "Global batches per evaluation (the same pairs each time, a partial last batch "
        "included); -1 scores every validation pair exactly once, as the SimPO recipes evaluate."
    )
    eval_only: bool = _opt(False, "Evaluate the loaded checkpoint and exit.")

    def validate(self) -> None:
        _require_positive(self, "log_interval")
        if self.health_check_window < 0:
            raise ConfigError(f"--health-check-window must be >= 0, got {self.health_check_window}")
        if self.eval_iters < 1 and self.eval_iters != -1:
            raise ConfigError(f"--eval-iters must be >= 1, or -1 for the whole validation set; got {self.eval_iters}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@functools.cache
def _section_of() -> dict[str, str]:
    """Field name -> the name of the section that holds it (names are unique across sections)."""
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise TypeError(f"field {f.name!r} is in sections {owner[f.name]!r} and {section!r}")
            owner[f.name] = section
    return owner


# ==================================================================== the job
@dataclass
class SimPOConfig:
    """All settings of a run, by section. ``cfg.model.hidden_size`` is the flag ``--hidden-size``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, **kwargs: Any) -> "SimPOConfig":
        """A config from flat settings (flag names with underscores), the rest defaults."""
        return cls().replace(**{**(values or {}), **kwargs})

    def replace(self, **values: Any) -> "SimPOConfig":
        """A copy with the given flat settings changed."""
        owner = _section_of()
        unknown = sorted(set(values) - set(owner))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            changes.setdefault(owner[name], {})[name] = value
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **v) for s, v in changes.items()}
        )

    def to_flat(self) -> dict[str, Any]:
        """Every setting by its flat name (what checkpoints record)."""
        return {k: v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    # ---------------------------------------------------------------- derived values
    def padded_vocab_size(self, world_tp: int | None = None) -> int:
        """The vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (Megatron)."""
        tp = world_tp or self.parallel.tensor_model_parallel_size
        multiple = self.model.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.model.vocab_size / multiple) * multiple)

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
        )

    def virtual_pipeline_model_parallel_size(self) -> int | None:
        per_vstage = self.parallel.num_layers_per_virtual_pipeline_stage
        if per_vstage is None:
            return None
        return self.model.num_layers // (self.parallel.pipeline_model_parallel_size * per_vstage)

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: int) -> "SimPOConfig":
        """Each section, then the sections against each other and the world size; raise ConfigError."""
        for section in SECTIONS:
            getattr(self, section).validate()
        model, par, data = self.model, self.parallel, self.data
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        cp = par.context_parallel_size
        if world_size % par.model_parallel_size != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
                f"x --pipeline-model-parallel-size ({pp})"
                + (f" x --context-parallel-size ({cp})" if cp > 1 else "")
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
        dp = self.data_parallel_size(world_size)
        if data.global_batch_size % (data.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"--global-batch-size ({data.global_batch_size}) is not divisible by "
                f"--micro-batch-size ({data.micro_batch_size}) x data-parallel size ({dp})"
            )
        if self.virtual_pipeline_model_parallel_size() is not None and self.num_micro_batches(world_size) % pp != 0:
            raise ConfigError(
                f"the interleaved schedule needs the number of micro-batches "
                f"({self.num_micro_batches(world_size)}) to be a multiple of --pipeline-model-parallel-size ({pp})"
            )
        if cp > 1 and data.seq_length % (2 * cp) != 0:
            raise ConfigError(
                f"--seq-length ({data.seq_length}) must be divisible by 2 x --context-parallel-size "
                f"({2 * cp}): each sequence is split into that many equal chunks"
            )
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
        if par.sequence_parallel and (data.seq_length // cp) % tp != 0:
            raise ConfigError(
                f"--seq-length ({data.seq_length}) must be divisible by --tensor-model-parallel-size "
                f"({tp}) x --context-parallel-size ({cp}) with --sequence-parallel"
            )
        if par.use_distributed_optimizer and self.optimizer.optimizer != "adam":
            raise ConfigError("--use-distributed-optimizer supports --optimizer adam only (megatron-core)")
        if self.logging.eval_only and not self.checkpoint.load:
            raise ConfigError("--eval-only needs --load")
        return self


# ==================================================================== flags and YAML
@functools.cache
def _fields() -> dict[str, tuple[dataclasses.Field, type, bool]]:
    """Every setting: (its field, its scalar type, whether it is a list)."""
    out = {}
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            origin = typing.get_origin(tp)
            if origin is list:
                out[f.name] = (f, typing.get_args(tp)[0], True)
            elif origin in (typing.Union, types.UnionType):
                out[f.name] = (f, next(a for a in typing.get_args(tp) if a is not type(None)), False)
            else:
                out[f.name] = (f, tp, False)
    return out


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, grouped by section; defaults left out (SUPPRESS)."""
    parser = argparse.ArgumentParser(
        description="SimPO preference optimization on Megatron-Core.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of settings; command-line flags override it.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            _, scalar, is_list = _fields()[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{f.metadata['help']} (default: {default})"
            if scalar is bool:
                # Megatron-LM's negative switches (--no-load-optim) are plain store_true flags.
                action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
                group.add_argument(_flag(f.name), action=action, help=help_text)
                continue
            choices = f.metadata.get("choices")
            if choices is not None:
                choices = [c for c in choices if c is not None]
            group.add_argument(
                _flag(f.name), type=scalar, nargs="+" if is_list else None, choices=choices, help=help_text
            )
    return parser


def load_config(argv: Sequence[str] | None = None) -> SimPOConfig:
    """Defaults, then the YAML file of --config, then the command-line flags."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
    values.update(given)
    return SimPOConfig.from_flat(values)


def read_yaml(path: str) -> dict[str, Any]:
    """Flat settings from a YAML mapping: keys may use dashes or underscores, and may sit under
    their section's name (``model: {hidden_size: 4096}``); unknown keys are errors."""
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    items: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if str(key) in SECTIONS and isinstance(value, dict):
            items.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            items.append((str(key), value))
    known = _fields()
    values = {}
    for key, value in items:
        section, _, short = key.rpartition(".")
        name = short.replace("-", "_")
        if name not in known or (section and _section_of()[name] != section):
            raise ConfigError(f"{path}: unknown setting {key!r}")
        _, scalar, is_list = known[name]
        if is_list:
            value = [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        elif value is not None and scalar is float:
            value = float(value)
        values[name] = value
    return values
