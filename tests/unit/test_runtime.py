"""The CPU support for megatron-core exists only between initialize_distributed and destroy_distributed."""

import pytest
import torch

from simpo_megatron.testing import run_distributed


def _mode_stack_depth() -> int:
    return len(torch.overrides._get_current_function_mode_stack())


def _enter_and_leave():
    import megatron.core.tensor_parallel.random as tp_random

    from simpo_megatron import runtime

    originals = {
        "current_device": torch.cuda.current_device,
        "Stream": torch.cuda.Stream,
        "rng": tp_random._get_cuda_rng_state,
    }
    before = (runtime.cpu_support_active(), _mode_stack_depth())
    runtime.initialize_distributed(runtime.ParallelLayout())
    during = {
        "active": runtime.cpu_support_active(),
        "modes": _mode_stack_depth(),
        "replaced": torch.cuda.current_device is not originals["current_device"],
        "cuda_to_cpu": torch.zeros(2, device="cuda").device.type,
        "type_name": torch.zeros(2).type(),
        "p2p": runtime.pipeline_communication_settings(),
    }
    runtime.destroy_distributed()
    after = {
        "active": runtime.cpu_support_active(),
        "modes": _mode_stack_depth(),
        "restored": torch.cuda.current_device is originals["current_device"]
        and torch.cuda.Stream is originals["Stream"]
        and tp_random._get_cuda_rng_state is originals["rng"],
        "type_name": torch.zeros(2).type(),
    }
    # A second world in the same process gets the support again.
    runtime.initialize_distributed(runtime.ParallelLayout())
    again = runtime.cpu_support_active()
    runtime.destroy_distributed()
    return before, during, after, again


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU support is entered only without CUDA")
def test_cpu_support_is_scoped_to_the_distributed_world():
    before, during, after, again = run_distributed(_enter_and_leave, 1)[0]
    assert before == (False, 0)
    assert during["active"] and during["modes"] == 1 and during["replaced"]
    assert during["cuda_to_cpu"] == "cpu" and during["type_name"] == "torch.cuda.FloatTensor"
    # gloo: unbatched p2p ops, stage outputs kept until the asynchronous sends finish.
    assert during["p2p"] == {"batch_p2p_comm": False, "deallocate_pipeline_outputs": False}
    assert after == {"active": False, "modes": 0, "restored": True, "type_name": "torch.FloatTensor"}
    assert again


def test_pipeline_settings_follow_the_backend_not_the_device(monkeypatch):
    import torch.distributed as dist

    from simpo_megatron.runtime import pipeline_communication_settings

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    assert pipeline_communication_settings() == {"batch_p2p_comm": True, "deallocate_pipeline_outputs": True}
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert pipeline_communication_settings() == {"batch_p2p_comm": False, "deallocate_pipeline_outputs": False}
