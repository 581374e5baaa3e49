"""The SimPO entry point with one checkpoint save killed half-way (for test_resume.py).

Run as ``torchrun --nproc-per-node N tests/distributed/crash_during_save.py FLAGS`` with
``CRASH_AT_SAVE=K`` in the environment: the K-th call of ``dist_checkpointing.save`` on
every rank writes a truncated shard file into the checkpoint directory it was given (the
``iter_XXXXXXX.tmp`` one) and then SIGKILLs its own process, as a node failure mid-write.
"""

import multiprocessing
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron.core import dist_checkpointing  # noqa: E402

_real_save = dist_checkpointing.save
_crash_at = int(os.environ["CRASH_AT_SAVE"])
_calls = 0


def _save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls == _crash_at:
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(checkpoint_dir, f"__{rank}_0.distcp"), "wb") as fh:
            fh.write(b"PARTIAL" * 64)  # a shard cut short: no metadata, no other files
            fh.flush()
            os.fsync(fh.fileno())
        print(f"rank {rank}: killed while saving to {checkpoint_dir}", flush=True)
        for helper in multiprocessing.active_children():  # as a crash of the node takes them too
            helper.kill()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)


dist_checkpointing.save = _save

if __name__ == "__main__":
    from simpo_megatron.training.loop import main

    sys.exit(main(sys.argv[1:]))
