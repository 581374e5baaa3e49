"""Transformer Engine layers and FP8 training: flag mapping and the checks that they can run here.

Neither is ever silently dropped: asked for where Transformer Engine, a GPU, or for FP8 a
capable GPU is missing, the run stops at start and says what is missing.
"""

from __future__ import annotations

from typing import Any

import torch

from simpo_megatron.config import ModelConfig

# Minimum CUDA compute capability of each recipe (Hopper/Ada for FP8, Blackwell for MXFP8).
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


class TransformerEngineUnavailableError(RuntimeError):
    """``--transformer-impl transformer_engine`` was asked for where Transformer Engine cannot run."""


class FP8UnavailableError(RuntimeError):
    """``--fp8-format`` was asked for where FP8 cannot run (Transformer Engine runs)."""


def fp8_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The TransformerConfig fields for the FP8 flags (empty without --fp8-format).

    The output layer and the log-prob computation are outside the FP8 region: megatron-core
    applies FP8 autocast to the transformer layers only, and logits are upcast to fp32.
    """
    if cfg.fp8_format is None:
        return {}
    return {
        "fp8": cfg.fp8_format,
        "fp8_recipe": cfg.fp8_recipe,
        "fp8_margin": cfg.fp8_margin,
        "fp8_amax_history_len": cfg.fp8_amax_history_len,
        "fp8_amax_compute_algo": cfg.fp8_amax_compute_algo,
        "fp8_param": cfg.fp8_param_gather,
    }


def check_transformer_engine(cfg: ModelConfig) -> None:
    """Raise unless Transformer Engine (TransformerEngineUnavailableError) and FP8, if asked for
    (FP8UnavailableError), can run here."""
    if not torch.cuda.is_available():
        raise TransformerEngineUnavailableError(
            "--transformer-impl transformer_engine needs a CUDA GPU, and none is available; "
            "use --transformer-impl local (without --fp8-format) on this machine"
        )
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        raise TransformerEngineUnavailableError(
            "--transformer-impl transformer_engine needs the transformer_engine package "
            f"(pip install transformer_engine[pytorch]); importing it failed: {e}"
        ) from e
    if cfg.fp8_format is not None:
        need = _MIN_CAPABILITY[cfg.fp8_recipe]
        have = torch.cuda.get_device_capability()
        if have < need:
            raise FP8UnavailableError(
                f"--fp8-recipe {cfg.fp8_recipe} needs a GPU of compute capability "
                f"{need[0]}.{need[1]} or newer; this one is {have[0]}.{have[1]}"
            )
