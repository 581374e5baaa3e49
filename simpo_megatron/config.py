"""One typed configuration for a SimPO run: Megatron-LM flag names, a YAML file, validation.

Every field of ``SimPOConfig`` is a command-line flag named as in Megatron-LM (``hidden_size``
is ``--hidden-size``); the SimPO knobs follow the SimPO repository (``--beta``,
``--gamma-beta-ratio``, ``--loss-type``, ``--label-smoothing``, ``--sft-weight``).
``--config FILE.yaml`` sets the same keys; flags given on the command line override it.
``validate()`` checks everything once, before any work, with messages that name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml


def _opt(default: Any, help: str, choices: Sequence[Any] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list_opt(help: str):
    return field(default_factory=list, metadata={"help": help, "choices": None})


@dataclass
class SimPOConfig:
    """All settings of a run. Field ``x_y`` is the flag ``--x-y`` and the YAML key ``x_y``."""

    # --- model (Llama family) ---
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

    # --- parallelism ---
    tensor_model_parallel_size: int = _opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(1, "Pipeline-parallel size.")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(None, "Layers per virtual pipeline stage (interleaved 1F1B).")
    sequence_parallel: bool = _opt(False, "Sequence parallelism (needs TP > 1 and Transformer Engine or Apex norms).")
    context_parallel_size: int = _opt(1, "Context-parallel size (only 1 is supported).")
    use_distributed_optimizer: bool = _opt(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    dist_ckpt_optim_fully_reshardable: bool = _opt(
        False, "Save distributed-optimizer state so that it loads on any TP/PP/DP layout "
        "(gathers it at save time); by default it reshards over data-parallel ranks only."
    )
    overlap_grad_reduce: bool = _opt(False, "Overlap the data-parallel gradient reduce with backward.")
    overlap_param_gather: bool = _opt(False, "Overlap the distributed optimizer's parameter all-gather.")

    # --- batches ---
    micro_batch_size: int = _opt(4, "Preference pairs per micro-batch (2x sequences).")
    global_batch_size: int = _opt(8, "Preference pairs per optimizer step, over all data-parallel ranks.")
    seq_length: int = _opt(256, "Tokens per sequence (prompt + response).")
    max_prompt_length: int | None = _opt(None, "Keep at most this many prompt tokens when truncating.")
    pad_to_multiple_of: int = _opt(
        8, "Pad each micro-batch to its longest sequence rounded up to this multiple "
        "(0: always to --seq-length)."
    )
    packing: bool = _opt(
        False, "Pack the sequences of each global batch densely into rows of --seq-length "
        "(attention within each sequence only); a packed micro-batch holds at most "
        "2 x --micro-batch-size x --seq-length tokens."
    )
    logprob_chunk_size: int = _opt(
        0, "Compute the log-prob head from the hidden states in chunks of this many tokens, "
        "so the full-vocabulary logits of a micro-batch never exist at once (0: off)."
    )

    # --- SimPO ---
    loss: str = _opt("simpo", "Preference loss, by registry name.")
    beta: float = _opt(2.0, "SimPO beta: scale of the reward (beta * average log-prob).")
    gamma_beta_ratio: float = _opt(0.5, "SimPO target margin gamma/beta (as in the SimPO repository).")
    loss_type: str = _opt("sigmoid", "SimPO loss type.", ("sigmoid", "hinge"))
    label_smoothing: float = _opt(0.0, "Label smoothing of the sigmoid loss, in [0, 0.5].")
    sft_weight: float = _opt(0.0, "Weight of the SFT term (-logp of the chosen response).")
    average_log_prob: bool = _opt(True, "Length-normalized log-probs (SimPO); --no-average-log-prob sums.")

    # --- optimizer and schedule ---
    optimizer: str = _opt("adam", "Optimizer.", ("adam", "sgd"))
    lr: float = _opt(1e-4, "Peak learning rate.")
    min_lr: float = _opt(0.0, "Learning rate at the end of the decay.")
    lr_decay_style: str = _opt("cosine", "Decay after warmup.", ("constant", "linear", "cosine"))
    lr_decay_iters: int | None = _opt(None, "Iterations of decay (default: --train-iters).")
    lr_warmup_iters: int = _opt(0, "Linear warmup iterations.")
    lr_warmup_fraction: float | None = _opt(None, "Warmup as a fraction of the decay iterations.")
    weight_decay: float = _opt(0.0, "Decoupled weight decay.")
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.95, "Adam beta2.")
    adam_eps: float = _opt(1e-8, "Adam epsilon.")
    sgd_momentum: float = _opt(0.0, "SGD momentum.")
    clip_grad: float = _opt(1.0, "Clip the global gradient norm to this (0 disables).")
    bf16: bool = _opt(False, "bf16 parameters and compute (GPU).")
    fp16: bool = _opt(False, "fp16 parameters and compute with dynamic loss scaling (GPU).")
    initial_loss_scale: float = _opt(2.0**16, "Initial dynamic loss scale for --fp16.")
    train_iters: int = _opt(100, "Optimizer steps to train for.")
    seed: int = _opt(1234, "Random seed.")

    # --- data ---
    data_path: list[str] = _list_opt("Preprocessed prefixes, optionally weighted: 'A' or '0.7 A 0.3 B'.")
    valid_data_path: list[str] = _list_opt("Separate validation prefixes (instead of --split).")
    split: str = _opt("98,2,0", "Train/valid/test split of --data-path, in proportions.")
    tokenizer_type: str | None = _opt(None, "Tokenizer type.", (None, "SentencePieceTokenizer", "HuggingFaceTokenizer"))
    tokenizer_model: str | None = _opt(None, "Tokenizer model file or directory.")
    mock_data: bool = _opt(False, "Train on built-in synthetic preference pairs (no --data-path).")
    num_workers: int = _opt(0, "DataLoader worker processes.")

    # --- checkpoints, evaluation, logging ---
    save: str | None = _opt(None, "Directory to save checkpoints to.")
    load: str | None = _opt(None, "Directory (or HF model directory) to load from.")
    save_interval: int | None = _opt(None, "Save every this many iterations.")
    no_load_optim: bool = _opt(False, "Do not load optimizer state.")
    no_load_rng: bool = _opt(False, "Do not load RNG state.")
    finetune: bool = _opt(False, "Load weights only and start at iteration 0.")
    eval_interval: int | None = _opt(None, "Evaluate every this many iterations.")
    eval_iters: int = _opt(10, "Batches per evaluation.")
    eval_only: bool = _opt(False, "Evaluate the loaded checkpoint and exit.")
    log_interval: int = _opt(10, "Print metrics every this many iterations.")
    tensorboard_dir: str | None = _opt(None, "Write TensorBoard events here.")
    metrics_file: str | None = _opt(None, "Metrics JSONL (default: SAVE/metrics.jsonl when --save is set).")
    max_skipped_iters: int = _opt(10, "Stop after this many consecutive non-finite updates.")

    # --- FP8 (Transformer Engine) ---
    fp8_format: str | None = _opt(None, "FP8 format; enables FP8.", (None, "e4m3", "hybrid"))
    fp8_recipe: str = _opt("delayed", "FP8 scaling recipe.", ("delayed", "tensorwise", "mxfp8", "blockwise"))
    fp8_margin: int = _opt(0, "FP8 scaling margin.")
    fp8_amax_history_len: int = _opt(1024, "FP8 amax history length (delayed scaling).")
    fp8_amax_compute_algo: str = _opt("max", "FP8 amax reduction over the history.", ("max", "most_recent"))
    fp8_param_gather: bool = _opt(False, "Keep parameters in FP8 and all-gather them in FP8.")

    # ---------------------------------------------------------------- derived values
    def padded_vocab_size(self, world_tp: int | None = None) -> int:
        """The vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (Megatron)."""
        tp = world_tp or self.tensor_model_parallel_size
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def derived_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if not self.swiglu:
            return 4 * self.hidden_size
        return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    def num_micro_batches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def virtual_pipeline_model_parallel_size(self) -> int | None:
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        return self.num_layers // (self.pipeline_model_parallel_size * self.num_layers_per_virtual_pipeline_stage)

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: int) -> "SimPOConfig":
        """Check the settings against each other and the world size; raise ConfigError naming the flag."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "micro_batch_size", "global_batch_size", "num_layers", "hidden_size",
                     "num_attention_heads", "seq_length", "train_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if cp != 1:
            raise ConfigError("--context-parallel-size > 1 is not supported yet")
        for name in ("pad_to_multiple_of", "logprob_chunk_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if world_size % (tp * pp * cp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
                f"x --pipeline-model-parallel-size ({pp})"
            )
        dp = self.data_parallel_size(world_size)
        if self.num_attention_heads % tp != 0:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) is not divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups != 0:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) is not divisible by "
                f"--num-query-groups ({groups})"
            )
        if groups % tp != 0:
            raise ConfigError(
                f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) is not divisible by --num-attention-heads "
                f"({self.num_attention_heads}); set --kv-channels"
            )
        if self.num_layers % pp != 0:
            raise ConfigError(
                f"--num-layers ({self.num_layers}) is not divisible by "
                f"--pipeline-model-parallel-size ({pp})"
            )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            per_stage = self.num_layers // pp
            if pp < 2:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            if per_stage % self.num_layers_per_virtual_pipeline_stage != 0:
                raise ConfigError(
                    f"layers per pipeline stage ({per_stage}) is not divisible by "
                    f"--num-layers-per-virtual-pipeline-stage ({self.num_layers_per_virtual_pipeline_stage})"
                )
        if self.global_batch_size % (self.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) is not divisible by "
                f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size ({dp})"
            )
        if (self.virtual_pipeline_model_parallel_size() is not None
                and self.num_micro_batches(world_size) % pp != 0):
            raise ConfigError(
                f"the interleaved schedule needs the number of micro-batches "
                f"({self.num_micro_batches(world_size)}) to be a multiple of "
                f"--pipeline-model-parallel-size ({pp})"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and self.seq_length % tp != 0:
            raise ConfigError(
                f"--seq-length ({self.seq_length}) must be divisible by --tensor-model-parallel-size "
                f"({tp}) with --sequence-parallel"
            )
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are mutually exclusive")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.seq_length:
            raise ConfigError(
                f"--max-prompt-length ({self.max_prompt_length}) must be in [1, --seq-length)"
            )
        if self.seq_length < 2:
            raise ConfigError("--seq-length must be >= 2 (a prompt token and a response token)")
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) exceeds --lr ({self.lr})")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        if self.use_distributed_optimizer and self.optimizer != "adam":
            raise ConfigError("--use-distributed-optimizer supports --optimizer adam only (megatron-core)")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
        if self.fp8_format is not None and self.transformer_impl != "transformer_engine":
            raise ConfigError("--fp8-format needs --transformer-impl transformer_engine")
        if self.fp8_param_gather and self.fp8_format is None:
            raise ConfigError("--fp8-param-gather needs --fp8-format")
        if self.mock_data == bool(self.data_path):
            raise ConfigError("give exactly one of --data-path and --mock-data")
        if self.data_path and not self.tokenizer_model:
            raise ConfigError("--data-path needs --tokenizer-type and --tokenizer-model")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.eval_only and not self.load:
            raise ConfigError("--eval-only needs --load")
        from simpo_megatron.losses import _check_simpo_args, get_loss

        try:
            get_loss(self.loss)
        except ValueError as e:
            raise ConfigError(f"--loss: {e}") from None
        try:
            _check_simpo_args(self.beta, self.loss_type, self.label_smoothing, self.sft_weight)
        except ValueError as e:
            # The messages start with the argument's name ("beta must be > 0, ..."): name the flag.
            name = e.args[0].split()[0]
            message = str(e).replace(name, _flag(name), 1).replace("loss_type=", "--loss-type ")
            raise ConfigError(message) from None
        return self


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(SimPOConfig)


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """The scalar type of a field and whether it is a list."""
    tp = _type_hints()[f.name]
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], False
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; defaults are left out (SUPPRESS)."""
    parser = argparse.ArgumentParser(
        description="SimPO preference optimization on Megatron-Core.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of settings; command-line flags override it.")
    for f in dataclasses.fields(SimPOConfig):
        scalar, is_list = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if scalar is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = f.metadata.get("choices")
        if choices is not None:
            choices = [c for c in choices if c is not None]
        parser.add_argument(
            _flag(f.name), type=scalar, nargs="+" if is_list else None, choices=choices,
            help=help_text,
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
    return SimPOConfig(**values)


def read_yaml(path: str) -> dict[str, Any]:
    """Settings from a YAML mapping; keys may use dashes or underscores; unknown keys are errors."""
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(SimPOConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        scalar, is_list = _field_type(known[name])
        if is_list:
            value = [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        elif value is not None and scalar is float:
            value = float(value)
        values[name] = value
    return values
