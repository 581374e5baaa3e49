"""When a run stops before ``--train-iters``: a signal, a time limit, an iteration count.

As Megatron-LM, each ends with a checkpoint and a clean exit (code 0, so that torchrun does
not restart the workers): ``--exit-signal-handler`` (SIGTERM / SIGINT, e.g. a scheduler's
warning before the job's time limit), ``--exit-duration-in-mins`` (minutes since the run
started, set-up included) and ``--exit-interval`` (iterations). Every rank must stop at the
same iteration: the signal and the elapsed time are agreed on with one all-reduce (MAX) per
iteration, since a signal may reach some ranks only and clocks differ.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignal:
    """Records SIGTERM / SIGINT instead of dying, so that the run can save first.

    Installed only when ``enabled``; ``restore`` puts the previous handlers back.
    """

    def __init__(self, enabled: bool = True):
        self.received = False
        self._previous = {}
        if enabled:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def exit_reason(
    iteration: int,
    signal_received: bool,
    elapsed_mins: float,
    exit_interval: int | None,
    exit_duration_in_mins: float | None,
) -> str | None:
    """Why the run stops after ``iteration`` (None: it goes on); inputs already agreed on by all ranks."""
    if signal_received:
        return f"exit signal received at iteration {iteration}"
    if exit_duration_in_mins is not None and elapsed_mins > exit_duration_in_mins:
        return (
            f"exiting at iteration {iteration}: {elapsed_mins:.2f} minutes since the start exceed "
            f"--exit-duration-in-mins {exit_duration_in_mins:g}"
        )
    if exit_interval and iteration % exit_interval == 0:
        return f"exiting at iteration {iteration}: --exit-interval {exit_interval}"
    return None


class RunControl:
    """Decides, the same way on every rank, whether the run stops after an iteration."""

    def __init__(self, checkpoint_cfg, start_time: float):
        """``start_time``: ``time.monotonic()`` when the run began (what the duration counts from)."""
        self.exit_interval = checkpoint_cfg.exit_interval
        self.exit_duration_in_mins = checkpoint_cfg.exit_duration_in_mins
        self.start_time = start_time
        self.signal = ExitSignal(enabled=checkpoint_cfg.exit_signal_handler)
        self._collective = checkpoint_cfg.exit_signal_handler or self.exit_duration_in_mins is not None

    def check(self, iteration: int) -> str | None:
        """Collective when a signal or a duration is watched: every rank calls it each iteration."""
        received, elapsed = self.signal.received, (time.monotonic() - self.start_time) / 60
        if self._collective:
            flags = torch.tensor([float(received), elapsed], dtype=torch.float64)
            if torch.cuda.is_available():
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            received, elapsed = bool(flags[0].item()), float(flags[1].item())
        return exit_reason(iteration, received, elapsed, self.exit_interval, self.exit_duration_in_mins)

    def close(self) -> None:
        self.signal.restore()
