"""Test-wide settings.

The suite runs on the CPU whatever the machine: multi-process tests use gloo, and every
process the tests start inherits ``CUDA_VISIBLE_DEVICES=""``. The GPUs that were visible are
remembered in ``SIMPO_TEST_VISIBLE_GPUS`` for tests/gpu, whose cases run in a child process
that sees them again (tests/gpu/gpu_child.py).
"""

import os
import warnings

if "SIMPO_TEST_VISIBLE_GPUS" not in os.environ:
    os.environ["SIMPO_TEST_VISIBLE_GPUS"] = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# megatron-core's import-time warnings about Apex and TE.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*", category=UserWarning)
