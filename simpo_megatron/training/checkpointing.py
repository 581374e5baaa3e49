"""Checkpoints with megatron-core dist_checkpointing: atomic saves, exact resume, resharding.

Layout (as Megatron-LM): ``SAVE/iter_0000100/`` holds one dist checkpoint, and
``SAVE/latest_checkpointed_iteration.txt`` names the newest complete one. A save is written
to ``iter_XXXXXXX.tmp`` and renamed into place only once every rank has finished; the
tracker file is replaced last, also through a rename. A crash at any point leaves the last
good checkpoint and the tracker pointing to it untouched.

Model and optimizer state are sharded tensors, so a checkpoint saved on one TP/PP layout
loads on another. RNG states are per (PP, TP, DP x CP) rank and are restored only on the same
layout (and device kind): a resume with dropout then draws the same masks as the run that
was never stopped.

``Checkpointer`` is what the training loop uses: it decides how a run starts (resume, a
Hugging Face model, a Megatron checkpoint, or fresh weights) and saves at intervals and at
the end.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import random
import re
import shutil
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint import FileSystemReader

from simpo_megatron.checkpoint_format import (  # noqa: F401 - public API of this module
    FORMAT_VERSION,
    TRACKER_FILE,
    CheckpointError,
    checkpoint_dir,
    read_tracker,
)
from simpo_megatron.fsutil import atomic_write_text, publish
from simpo_megatron.hf import is_hf_checkpoint, load_hf_weights, save_hf_config
from simpo_megatron.training.collective_errors import set_phase
from simpo_megatron.training.monitor import print_rank_last
from simpo_megatron.training.retention import prune_checkpoints


def _check_model_shapes(ckpt: str, sharded: dict) -> None:
    """Refuse a checkpoint of another model shape, naming the first tensor that differs
    (dist_checkpointing would fail deep inside torch.distributed.checkpoint instead)."""
    saved = dist_checkpointing.load_tensors_metadata(ckpt)
    for tensor in nested_values(sharded):
        if not isinstance(tensor, ShardedTensor):
            continue
        theirs = saved.get(tensor.key)
        if theirs is None or tuple(theirs.global_shape) != tuple(tensor.global_shape):
            found = "absent" if theirs is None else f"of shape {tuple(theirs.global_shape)}"
            raise CheckpointError(
                f"{ckpt} holds another model: {tensor.key} is {found} there, {tuple(tensor.global_shape)} "
                "in this run; pass the checkpoint's --num-layers, --hidden-size, --ffn-hidden-size, "
                "--num-attention-heads, --num-query-groups and --kv-channels"
            )


def _check_checkpoint_files(ckpt: str) -> None:
    """Refuse a checkpoint whose files are missing or shorter than its index says, naming the
    file (at start: the load itself would fail deep inside torch.distributed.checkpoint)."""
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(ckpt, name)):
            raise CheckpointError(f"{os.path.join(ckpt, name)} is missing: {ckpt} is incomplete or damaged{_EARLIER}")
    try:
        metadata = FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # noqa: BLE001 - an unpickling error of any kind
        raise CheckpointError(f"{os.path.join(ckpt, '.metadata')} is damaged ({e!r}){_EARLIER}") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative, end in sorted(needed.items()):
        path = os.path.join(ckpt, relative)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: {ckpt} is incomplete or damaged{_EARLIER}")
        if os.path.getsize(path) < end:
            raise CheckpointError(
                f"{path} is truncated ({os.path.getsize(path)} bytes, the checkpoint's index needs {end}){_EARLIER}"
            )


# What a damaged checkpoint's message suggests.
_EARLIER = f"; resume from an earlier checkpoint (write its iteration to {TRACKER_FILE}) or start afresh"


@contextlib.contextmanager
def _reading(ckpt: str):
    """A checkpoint file that cannot be read (corrupted: same size, bad bytes) as CheckpointError
    naming the checkpoint, instead of an unpickling error deep in torch."""
    try:
        yield
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        unreadable = _find_exception(e, (EOFError, pickle.UnpicklingError, OSError, zipfile.BadZipFile))
        if unreadable is None and "PytorchStreamReader" not in str(e):
            raise
        lines = str(e).strip().splitlines()  # torch's CheckpointException ends with the rank's error
        cause = _first_line(unreadable) if unreadable is not None else (lines[-1] if lines else type(e).__name__)
        raise CheckpointError(f"reading {ckpt} failed, its files are damaged ({cause}){_EARLIER}") from e


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    """This rank's RNG states, taken after a step (its last dropout draw is behind it).

    Dropout draws from torch's default generator (hidden dropout) and from the tensor-parallel
    tracker's streams (attention dropout: the model-parallel stream, which differs between TP
    ranks); on a GPU both are CUDA generators. Without CUDA the CPU support maps the CUDA
    generator to the CPU one, so there "torch" is the default stream and the tracker holds CPU
    generator states.
    """
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _rng_ranks() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(PP, TP, DP x CP) sizes and this rank's place in them: the sharding of the RNG states.

    Every rank's dropout draws differ: TP ranks in the tracker's model-parallel stream, PP
    stages by seed, and DP / CP ranks by the shapes of their micro-batches (each is padded to
    its own longest sequence, and a draw consumes the generator by the tensor's size).
    """
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    )
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    return shape, rank


def _rng_sharded_object(state: dict | None) -> ShardedObject:
    """This rank's RNG states, one object per rank (see ``_rng_ranks``)."""
    shape, rank = _rng_ranks()
    return ShardedObject("rng_state", state, shape, rank, replica_id=0)


def _saved_rng_shape(ckpt: str) -> tuple[int, ...] | None:
    """The rank grid the checkpoint's RNG states were saved for (None: it holds none)."""
    for obj in load_sharded_metadata(ckpt).values():
        if isinstance(obj, ShardedObject) and obj.key == "rng_state":
            return tuple(obj.global_shape)
    return None


def _note_fresh_rng(why: str) -> None:
    if dist.get_rank() == 0:
        print(f"RNG states start fresh: {why}", flush=True)


def _model_sharded_state_dict(model) -> dict:
    chunks = [m.module if hasattr(m, "module") else m for m in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _padded_vocab_size(model) -> int:
    """The padded vocabulary size the model was built with (the same on every rank)."""
    chunk = model[0].module if hasattr(model[0], "module") else model[0]
    return chunk.vocab_size


def _optimizer_metadata(fully_reshardable: bool) -> dict:
    """How the distributed optimizer lays out its state (ignored by the plain optimizer)."""
    return {"distrib_optim_sharding_type": "fully_reshardable" if fully_reshardable else "dp_reshardable"}


def save_checkpoint(
    root: str,
    state,
    config_dict: dict | None = None,
    weights_only: bool = False,
    optim_fully_reshardable: bool = False,
    async_queue: AsyncCallsQueue | None = None,
) -> str:
    """Save ``state`` (a TrainState) as ``root/iter_<iteration>``; collective over all ranks.

    ``weights_only`` saves the model alone (what a converted Hugging Face model is): loading
    it starts training from iteration 0 with fresh optimizer state. ``state`` then needs only
    ``model`` and ``iteration``. ``optim_fully_reshardable`` lets distributed-optimizer state
    load on another TP/PP layout (by default it reshards over DP only, as in Megatron-LM).
    Returns the checkpoint directory. Saving an iteration that
    the tracker already names is a no-op (e.g. the final save right after an interval save).

    With ``async_queue`` the shards are written by a background process and the call returns
    once it has started; the checkpoint is renamed into place and the tracker written by the
    queue's finalization (``maybe_finalize_async_calls``, collective) once every rank's write
    is complete. Until then ``--load`` finds the previous checkpoint. A write that fails (a full disk) raises
    CheckpointError naming the directory, here or at finalization, and leaves the previous
    checkpoint and the tracker as they were.
    """
    iteration = state.iteration
    final = checkpoint_dir(root, iteration)
    if read_tracker(root) == iteration and os.path.isdir(final):
        return final
    tmp = final + ".tmp"
    set_phase(f"saving the checkpoint of iteration {iteration}")
    failed = None
    if dist.get_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            failed = e
    _raise_if_any_rank_failed(failed, root, tmp)

    sharded = _model_sharded_state_dict(state.model)
    if not weights_only:
        metadata = _optimizer_metadata(optim_fully_reshardable)
        sharded["optimizer"] = state.optimizer.sharded_state_dict(sharded, metadata=metadata)
        sharded["optimizer_metadata"] = metadata
        sharded["scheduler"] = state.scheduler.state_dict()
        sharded["rng_state"] = _rng_sharded_object(_rng_state())
        sharded["consumed_samples"] = state.consumed_samples
    sharded["weights_only"] = weights_only
    sharded["iteration"] = iteration
    sharded["layout"] = _layout()
    sharded["padded_vocab_size"] = _padded_vocab_size(state.model)
    sharded["format_version"] = FORMAT_VERSION
    if config_dict is not None:
        sharded["config"] = config_dict
    with _naming_failed_writes(root, tmp):
        request = dist_checkpointing.save(sharded, tmp, async_sharded_save=async_queue is not None)
    if async_queue is None:
        _publish_checkpoint(root, iteration)
    else:
        # megatron-core's finalization (gather every rank's write result, write the metadata),
        # then ours, all under one error translation.
        finalize = functools.partial(_finalize_async_save, list(request.finalize_fns), root, iteration)
        async_queue.schedule_async_request(request._replace(finalize_fns=[finalize]))
    return final


def _finalize_async_save(finalize_fns: list, root: str, iteration: int) -> None:
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    set_phase(f"completing the asynchronous save of iteration {iteration}")
    with _naming_failed_writes(root, tmp):
        for fn in finalize_fns:
            fn()
    _publish_checkpoint(root, iteration)


def _publish_checkpoint(root: str, iteration: int) -> None:
    """Rename the finished ``iter_XXXXXXX.tmp`` into place, then point the tracker to it (rank 0,
    after a barrier: every rank's shards are written). Collective; a failure raises on every rank."""
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    dist.barrier()
    failed = None
    if dist.get_rank() == 0:
        try:
            if os.path.isdir(final):
                shutil.rmtree(final)
            publish(tmp, final)
            atomic_write_text(os.path.join(root, TRACKER_FILE), str(iteration))
        except OSError as e:
            failed = e
    _raise_if_any_rank_failed(failed, root, tmp)


def _save_failure_message(error: BaseException, root: str, tmp: str) -> str:
    where = f"the checkpoint {tmp}"
    previous = read_tracker(root)
    kept = (
        f"{os.path.join(root, TRACKER_FILE)} still names iteration {previous}, which --load resumes from"
        if previous is not None
        else "the previous checkpoint, if any, is untouched"
    )
    os_error = _find_oserror(error)
    no_space = os_error is not None and os_error.errno == errno.ENOSPC
    cause = "no space left on device" if no_space else _first_line(os_error or error)
    fix = "Free space or point --save at another file system, then restart" if no_space else "Fix it, then restart"
    return f"saving {where} failed: {cause}; {kept}. {fix}"


def _find_oserror(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``; from its text when it crossed a process boundary (a writer
    process's exception reaches this one as text in a RuntimeError, "[Errno 28] ...")."""
    found = _find_exception(error, OSError)
    if found is not None:
        return found
    match = re.search(r"\[Errno (\d+)\] ([^:'\n]+)", _all_text(error))
    return OSError(int(match[1]), match[2].strip()) if match else None


def _all_text(error: BaseException | None) -> str:
    texts = []
    _find_exception(error, (), visit=lambda e: texts.append(str(e)))
    return "\n".join(texts)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _find_exception(error: BaseException | None, types, visit=None) -> BaseException | None:
    """The first exception of ``types`` among ``error``'s causes (megatron-core and torch wrap a
    worker's exception: ``__cause__`` / ``__context__``, and torch's per-rank ``failures``)."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if isinstance(e, tuple):  # torch's (exception, traceback) pairs
            stack += list(e)
            continue
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if visit is not None:
            visit(e)
        if isinstance(e, types):
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None


@contextlib.contextmanager
def _naming_failed_writes(root: str, tmp: str):
    """Turn a failed checkpoint write (an OSError, however megatron-core and torch wrap it)
    into a CheckpointError that names the directory and says what --load resumes from."""
    try:
        yield
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if _find_oserror(e) is None:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the space a partial write holds
        raise CheckpointError(_save_failure_message(e, root, tmp)) from e


def _raise_if_any_rank_failed(error: OSError | None, root: str, tmp: str) -> None:
    """Raise on every rank when ``error`` happened on one (so that none waits in a collective)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    if torch.cuda.is_available():
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise CheckpointError(f"saving the checkpoint {tmp} failed on rank 0 (see its message)")
        raise CheckpointError(_save_failure_message(error, root, tmp)) from error


def _restore_adam_steps(inner) -> None:
    """Each param's Adam step from its group's, as the checkpoint saved it.

    Without Apex or TE, megatron-core's DistributedOptimizer loads torch Adam's per-param
    "step" from placeholders and shares one tensor among all params (which Adam would then
    advance once per param): the group's "step" entry holds the saved value.
    """
    for group in inner.param_groups:
        for p in group["params"]:
            if "step" in group and "step" in inner.state.get(p, {}):
                inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


@contextmanager
def _keeping_adam_steps(o: DistributedOptimizer):
    """Load fully reshardable state into ``o`` although it holds torch Adam's per-param "step".

    megatron-core's fully reshardable loader leaves "step" out of each param's loaded state
    (the group's "step" carries it), then copies every state entry the param holds: without
    Apex or TE that includes "step", a KeyError. Hand it the param's own step back (a no-op
    copy); ``_restore_adam_steps`` then sets the saved value.
    """
    set_states = o._set_main_param_and_optimizer_states

    def set_states_with_step(model_param, tensors):
        group_index, group_order = o.model_param_group_index_map[model_param]
        own = o.optimizer.state[o.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in own and "step" not in tensors:
            tensors = {**tensors, "step": own["step"]}
        set_states(model_param, tensors)

    o._set_main_param_and_optimizer_states = set_states_with_step
    try:
        yield
    finally:
        del o._set_main_param_and_optimizer_states


def load_checkpoint(
    root: str,
    state,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
) -> int:
    """Load the newest checkpoint under ``root`` (a ``--save`` root, or one of its iteration
    directories) into ``state``; returns its iteration.

    ``finetune`` loads the weights only and starts at iteration 0. Optimizer and RNG states
    are skipped when asked; the RNG states are also skipped (with a note) when they were saved
    for other (PP, TP, DP x CP) sizes or on another device kind (CUDA or CPU): the run then
    keeps those it was seeded with.
    """
    iteration = read_tracker(root)
    if iteration is not None:
        ckpt = checkpoint_dir(root, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(
                f"{os.path.join(root, TRACKER_FILE)} names iteration {iteration}, but {ckpt} is missing"
            )
    elif os.path.isfile(os.path.join(root, "metadata.json")):  # an iteration directory
        ckpt = root
    else:
        raise CheckpointError(f"no checkpoint under {root!r}: {TRACKER_FILE} is missing")
    _check_checkpoint_files(ckpt)
    with _reading(ckpt):
        common = dist_checkpointing.load_common_state_dict(ckpt)
    if iteration is None:
        iteration = common["iteration"]
    saved_vocab, vocab = common.get("padded_vocab_size"), _padded_vocab_size(state.model)
    if saved_vocab != vocab:
        # dist_checkpointing would load the overlapping rows silently: refuse instead.
        raise CheckpointError(
            f"{ckpt} has a padded vocabulary of {saved_vocab} rows, this run {vocab}: set "
            "--make-vocab-size-divisible-by (padding is to a multiple of it x TP) so that they agree"
        )
    same_layout = {k: common["layout"][k] for k in ("tp", "pp")} == {k: _layout()[k] for k in ("tp", "pp")}
    finetune = finetune or common.get("weights_only", False)
    load_optim = load_optim and not finetune
    load_rng = load_rng and not finetune
    if not same_layout and dist.get_rank() == 0 and not finetune:
        print(
            f"loading a checkpoint saved with {common['layout']} on {_layout()}: "
            "resharding model and optimizer; RNG states start fresh",
            flush=True,
        )
    if load_rng:
        saved_rng, rng_shape = _saved_rng_shape(ckpt), _rng_ranks()[0]
        if saved_rng != rng_shape:
            if same_layout:  # otherwise the note above says so
                _note_fresh_rng(f"saved for (PP, TP, DP x CP) = {saved_rng}, this run is {rng_shape}")
            load_rng = False

    metadata = common.get("optimizer_metadata", _optimizer_metadata(False))
    optimizers = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    if (
        load_optim
        and not same_layout
        and any(isinstance(o, DistributedOptimizer) for o in optimizers)
        and metadata["distrib_optim_sharding_type"] != "fully_reshardable"
    ):
        raise CheckpointError(
            f"{ckpt} holds distributed-optimizer state that reshards over data-parallel ranks "
            f"only, and it was saved on {common['layout']}, not {_layout()}: pass --no-load-optim, "
            "or save with --dist-ckpt-optim-fully-reshardable"
        )
    sharded = _model_sharded_state_dict(state.model)
    _check_model_shapes(ckpt, sharded)
    if load_optim:
        for o in optimizers:
            # Its checkpoint layout is built from existing state, which torch's Adam (no Apex or
            # TE) creates at the first step only: placeholders for the load to overwrite.
            if isinstance(o, DistributedOptimizer) and not o.optimizer.state:
                o._init_optimizer_states_with_dummy_values()
        sharded["optimizer"] = state.optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    if load_rng:
        sharded["rng_state"] = _rng_sharded_object(None)
    with _reading(ckpt):
        loaded = dist_checkpointing.load(sharded, ckpt, strict=StrictHandling.ASSUME_OK_UNEXPECTED)

    chunks = [m.module if hasattr(m, "module") else m for m in state.model]
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"])
    if load_optim:
        # In fp32 the distributed optimizer's main params are views of the weights: copy into
        # them outside autograd, as any load.
        with torch.no_grad(), ExitStack() as stack:
            for o in optimizers:
                if isinstance(o, DistributedOptimizer):
                    stack.enter_context(_keeping_adam_steps(o))
            state.optimizer.load_state_dict(loaded["optimizer"])
        for o in optimizers:
            if isinstance(o, DistributedOptimizer):
                _restore_adam_steps(o.optimizer)
        state.scheduler.load_state_dict(common["scheduler"])
    else:
        # Mixed-precision optimizers keep fp32 main copies: refresh them from the new weights.
        state.optimizer.reload_model_params()
    if load_rng:
        rng = loaded["rng_state"]
        rng = rng.data if isinstance(rng, ShardedObject) else rng
        if ("cuda" in rng) == torch.cuda.is_available():
            _set_rng_state(rng)
        else:  # a CUDA generator's state does not fit the CPU one, nor the reverse
            _note_fresh_rng(f"they were saved {'with' if 'cuda' in rng else 'without'} CUDA")
    if finetune:
        state.iteration, state.consumed_samples = 0, 0
    else:
        state.iteration = common["iteration"]
        state.consumed_samples = common["consumed_samples"]
    return iteration


# The config entry that records the weights a run's first iteration started from (carried over
# by every resume), so that a resumed reference-based run keeps its reference.
START_WEIGHTS_KEY = "start_weights"


def config_to_dict(cfg) -> dict:
    """The run's settings by flat name, to store beside the checkpoint."""
    return cfg.to_flat()


def saved_config(root: str) -> dict:
    """The settings stored with the newest checkpoint under ``root`` ({} when none)."""
    iteration = read_tracker(root)
    if iteration is None:
        return {}
    return dist_checkpointing.load_common_state_dict(checkpoint_dir(root, iteration)).get("config") or {}


@dataclass(frozen=True)
class Start:
    """How a run began: ``source`` is "checkpoint" (``path`` loaded at ``iteration``),
    "hf" (the Hugging Face model at ``path``, iteration 0) or "fresh" (initialized weights).
    ``weights``: the weights loaded, by a path that keeps naming them: the HF directory, or the
    checkpoint's iteration directory (a root's tracker moves on when the run saves into it).
    ``reference``: the weights the run's first iteration started from, as the checkpoint
    records them (a reference-based loss's default reference; None when not recorded)."""

    source: str
    path: str | None = None
    iteration: int = 0
    reference: str | None = None
    weights: str | None = None


class Checkpointer:
    """The run's checkpoints: where it starts from, and its periodic and final saves (``--save``)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.save_dir = cfg.checkpoint.save
        self.config_dict = config_to_dict(cfg)
        self._resumed_from: int | None = None  # never deleted by retention
        # --async-save: megatron-core's queue of background writes (each a forked process), and
        # the iterations of those not yet complete, oldest first.
        self._async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save and self.save_dir else None
        self._pending: list[int] = []

    def start(self, state) -> Start:
        """Load what the run starts from into ``state``, and say what it was.

        In order: ``--save`` holds a checkpoint (and this is no ``--eval-only`` run): resume
        from it (a restarted or requeued job finds its own last checkpoint, whatever ``--load``
        names; ``--load`` is what the run first started from, and its ``--no-load-optim``,
        ``--no-load-rng`` and ``--finetune`` apply only when it names the same directory);
        ``--load`` names a Hugging Face
        model: load its weights as a fresh start (and keep its config and tokenizer in
        ``SAVE/hf_config`` for export); ``--load`` holds a checkpoint: load it (as
        ``--no-load-optim``, ``--no-load-rng`` and ``--finetune`` say); otherwise start from
        the initialized weights (as Megatron-LM, also when ``--load`` holds no checkpoint yet,
        so that ``--save`` and ``--load`` can name the same directory from the first run on).
        """
        start = self._start(state)
        self.config_dict[START_WEIGHTS_KEY] = start.reference if start.iteration > 0 else start.weights
        if start.source == "checkpoint" and _same_directory(start.path, self.save_dir):
            self._resumed_from = start.iteration
        return start

    def _start(self, state) -> Start:
        load = self.cfg.checkpoint.load
        if self.save_dir and not self.cfg.logging.eval_only and read_tracker(self.save_dir) is not None:
            own = bool(load) and _same_directory(load, self.save_dir)
            if load and not own:
                print_rank_last(f"resuming from --save {self.save_dir} (its newest checkpoint), not --load {load}")
            return self._load(self.save_dir, state, resume=not own)
        if load and is_hf_checkpoint(load):
            load_hf_weights(load, state.model, self.cfg)
            state.optimizer.reload_model_params()  # mixed-precision optimizers' fp32 copies
            if self.save_dir and dist.get_rank() == 0:
                save_hf_config(load, self.save_dir)  # export's default config and tokenizer
            print_rank_last(f"loaded the Hugging Face model {load}")
            return Start("hf", load, weights=load)
        if load and read_tracker(load) is not None:
            return self._load(load, state)
        if load:
            print_rank_last(f"no checkpoint in --load {load}: training from scratch")
        return Start("fresh")

    def _load(self, root: str, state, resume: bool = False) -> Start:
        """Load ``root``'s newest checkpoint; ``resume``: all of it (the run's own --save), else
        as --no-load-optim, --no-load-rng and --finetune say."""
        ckpt = self.cfg.checkpoint
        if resume:
            loaded = load_checkpoint(root, state)
        else:
            loaded = load_checkpoint(
                root, state, load_optim=not ckpt.no_load_optim, load_rng=not ckpt.no_load_rng, finetune=ckpt.finetune
            )
        print_rank_last(f"loaded {root} at iteration {state.iteration}")
        recorded = saved_config(root).get(START_WEIGHTS_KEY) if state.iteration > 0 else None
        return Start("checkpoint", root, state.iteration, reference=recorded, weights=checkpoint_dir(root, loaded))

    def save_if_due(self, state) -> str | None:
        """Save at every ``--save-interval`` iterations; the checkpoint directory, or None."""
        interval = self.cfg.checkpoint.save_interval
        if self.save_dir and interval and state.iteration % interval == 0:
            return self._save(state)
        return None

    def save_final(self, state) -> str | None:
        """The end-of-run save (a no-op when the interval save just wrote this iteration); with
        --async-save it waits until every pending save is complete."""
        if not self.save_dir:
            return None
        path = self._save(state)
        self.finalize_async_saves(blocking=True)
        print_rank_last(f"saved checkpoint {path}")
        return path

    def finalize_async_saves(self, blocking: bool = False) -> list[int]:
        """Complete the --async-save writes that have ended on every rank (all of them, waiting,
        with ``blocking``): each is renamed into place and the tracker names the newest.

        Returns the iterations whose checkpoints became complete, oldest first (only those may
        be counted on, or old ones deleted for). A no-op without pending saves; otherwise
        collective (the loop calls it on every rank at every iteration). A write that failed
        raises CheckpointError, naming the directory.
        """
        if not self._pending:
            return []
        done = self._async_queue.maybe_finalize_async_calls(blocking=blocking)
        completed, self._pending = self._pending[: len(done)], self._pending[len(done) :]
        for iteration in completed:
            print_rank_last(f"checkpoint of iteration {iteration} complete: {checkpoint_dir(self.save_dir, iteration)}")
        if completed:
            self.after_save()  # retention counts complete checkpoints only
        return completed

    def _save(self, state) -> str:
        if self._async_queue is not None:
            if self._pending and self._pending[-1] == state.iteration:
                return checkpoint_dir(self.save_dir, state.iteration)  # already being written
            # One background write at a time: each holds a copy of the state in memory.
            self.finalize_async_saves(blocking=True)
        path = save_checkpoint(
            self.save_dir,
            state,
            self.config_dict,
            optim_fully_reshardable=self.cfg.checkpoint.dist_ckpt_optim_fully_reshardable,
            async_queue=self._async_queue,
        )
        if self._async_queue is not None and read_tracker(self.save_dir) != state.iteration:
            self._pending.append(state.iteration)
        else:
            self.after_save()
        return path

    def after_save(self) -> list[int]:
        """Apply ``--keep-last-checkpoints`` once a save is complete (its tracker written), on rank 0.

        Called after every save; returns the iterations deleted (on rank 0; [] elsewhere).
        """
        keep_last = self.cfg.checkpoint.keep_last_checkpoints
        if not keep_last or dist.get_rank() != 0:
            return []
        protected = {self._resumed_from} if self._resumed_from is not None else set()
        deleted = prune_checkpoints(self.save_dir, keep_last, self.cfg.checkpoint.keep_checkpoint_every, protected)
        if deleted:
            print(f"deleted checkpoints of iterations {deleted} (--keep-last-checkpoints {keep_last})", flush=True)
        return deleted


def _same_directory(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return os.path.realpath(a) == os.path.realpath(b)
