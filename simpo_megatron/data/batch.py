"""One micro-batch of preference pairs, typed, and the one function that collates it.

A micro-batch of ``m`` pairs holds ``2m`` sequences ``prompt + response``, all chosen first,
then all rejected in the same pair order, so the last pipeline stage sees both members of
every pair. Two layouts:

- padded: ``[2m, S]`` rows, right-padded; row ``k`` is pair k's chosen sequence, row ``m + k``
  its rejected one;
- packed: one ``[1, T]`` row of the same sequences back to back (megatron-core's THD layout),
  described by a ``PackedLayout`` (``cu_seqlens``, ``segment_ids``, ...); positions restart at
  every sequence, and the tail padding is a segment of its own.

``labels[t]`` is the token after ``tokens[t]`` and ``loss_mask[t]`` is 1 exactly where that
label is a response token; ``token_mask[t]`` is 1 exactly where ``tokens[t]`` is a real token
(prompt or response, not padding). A sample (``{"prompt", "chosen", "rejected"}`` numpy token arrays)
may also carry ``"reference"``: float64 ``[4]`` = the reference model's summed log-probs of the
chosen and rejected responses and their token counts, which reference-based losses need; the
micro-batch then holds them as ``ReferenceScores``, in pair order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simpo_megatron.mathutil import round_up

PairSample = dict[str, np.ndarray]
REFERENCE_KEY = "reference"


@dataclass(frozen=True)
class PackedLayout:
    """Where the sequences of a packed row start and end.

    ``cu_seqlens`` (int32 ``[n + 1]``): cumulative real lengths, the tail padding one more
    sequence. ``segment_ids`` (``[1, T]``): each token's sequence, ``k`` for pair k's chosen,
    ``m + k`` for its rejected, ``2m`` for the tail padding. ``cu_seqlens_padded``: with
    context parallelism every sequence is padded to a multiple of ``2 x CP`` and these are the
    padded offsets (Transformer Engine's convention); ``max_seqlen`` is then the longest padded
    sequence.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    segment_ids: torch.Tensor
    cu_seqlens_padded: torch.Tensor | None = None

    def seq_params(self):
        """megatron-core's ``PackedSeqParams`` for attention within each sequence."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def to(self, device, non_blocking: bool = False) -> PackedLayout:
        return _tensors_to(self, device, non_blocking)


@dataclass(frozen=True)
class ReferenceScores:
    """The reference model's scores of a micro-batch's pairs, ``[m]`` each, in pair order.

    Summed log-probs (float64) of the chosen and rejected responses, and their token counts
    (int64), as a reference-based loss (DPO) needs them.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def stack(cls, rows: Sequence[np.ndarray]) -> ReferenceScores:
        """From one ``[4]`` array per pair: chosen_logp_sum, rejected_logp_sum, chosen_tokens, rejected_tokens."""
        table = np.asarray(rows, dtype=np.float64).reshape(len(rows), 4)
        counts = table[:, 2:]
        if np.any(counts != np.round(counts)) or np.any(counts < 0):
            raise ValueError(
                f"sample {REFERENCE_KEY!r}: token counts must be whole numbers >= 0, got {counts.tolist()}"
            )
        logps = torch.from_numpy(table[:, :2].copy())
        tokens = torch.from_numpy(counts.astype(np.int64))
        return cls(logps[:, 0], logps[:, 1], tokens[:, 0], tokens[:, 1])

    def to(self, device, non_blocking: bool = False) -> ReferenceScores:
        return _tensors_to(self, device, non_blocking)


@dataclass(frozen=True)
class MicroBatch:
    """What ``forward_step`` consumes: ``2 x pairs`` sequences, padded or packed.

    ``tokens``, ``labels`` (int64), ``loss_mask`` (float32) and ``position_ids`` are ``[rows, S]``.
    ``num_pairs`` and ``num_tokens`` count the real pairs and their real tokens (prompt +
    response, no padding); ``token_mask`` (float32 ``[rows, S]``) marks those tokens, None when
    every position is one. ``pair_weights`` (``[rows / 2]``, 1 real, 0 padding) is set when the
    micro-batch was topped up with padding pairs (evaluation) and keeps them out of every sum.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    num_pairs: int
    num_tokens: int
    pair_weights: torch.Tensor | None = None
    packed: PackedLayout | None = None
    reference: ReferenceScores | None = None
    token_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def to(self, device, non_blocking: bool = False) -> MicroBatch:
        """A copy with every tensor on ``device``."""
        return _tensors_to(self, device, non_blocking)

    def padded_to(self, width: int) -> MicroBatch:
        """Right-padded to ``width`` columns (masked padding, token and label id 0); for packed
        micro-batches the extra columns are one more padding sequence."""
        extra = width - self.width
        if extra < 0:
            raise ValueError(f"cannot pad a micro-batch of width {self.width} to {width}")
        if extra == 0:
            return self

        def pad(t: torch.Tensor, value: int = 0) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, extra), value=value)

        def one_more(cu: torch.Tensor | None) -> torch.Tensor | None:
            return None if cu is None else torch.cat([cu, cu[-1:] + extra])

        packed = self.packed
        if packed is None:
            position_ids = torch.arange(width, dtype=torch.int64).repeat(self.rows, 1)
        else:
            position_ids = torch.cat([self.position_ids, torch.arange(extra)[None]], dim=1)
            packed = PackedLayout(
                cu_seqlens=one_more(packed.cu_seqlens),
                max_seqlen=max(packed.max_seqlen, extra),
                segment_ids=pad(packed.segment_ids, 2 * self.num_pairs),
                cu_seqlens_padded=one_more(packed.cu_seqlens_padded),
            )
        return dataclasses.replace(
            self,
            tokens=pad(self.tokens),
            labels=pad(self.labels),
            loss_mask=pad(self.loss_mask),
            position_ids=position_ids,
            packed=packed,
            token_mask=pad(self.real_token_mask()),
        )

    def real_token_mask(self) -> torch.Tensor:
        """``token_mask``, or all ones when it is None."""
        return torch.ones_like(self.loss_mask) if self.token_mask is None else self.token_mask


def _tensors_to(obj, device, non_blocking: bool):
    """A copy of the dataclass ``obj`` with its tensor fields (nested dataclasses too) on ``device``."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device, non_blocking=non_blocking)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = value.to(device, non_blocking=non_blocking)
    return dataclasses.replace(obj, **changes)


@dataclass(frozen=True)
class BatchLayout:
    """How ``collate`` lays pairs out.

    Padded (``packed=False``): rows of ``seq_length`` columns, or, with ``pad_to_multiple_of``,
    of the longest row rounded up to that multiple (at most ``seq_length``). With ``pairs``
    the micro-batch is topped up to that many pairs with copies of ``filler`` (zero
    ``pair_weights``), so that a short evaluation micro-batch keeps its shape.

    Packed (``packed=True``): one row of every sequence, each padded at its end to a multiple of
    ``sequence_multiple_of`` (``2 x CP`` with context parallelism), the total to a multiple of
    ``pad_to_multiple_of`` (default: ``sequence_multiple_of``).
    """

    pad_id: int
    seq_length: int | None = None
    pad_to_multiple_of: int | None = None
    packed: bool = False
    sequence_multiple_of: int = 1
    pairs: int | None = None
    filler: PairSample | None = None

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.packed and self.pairs is not None:
            raise ValueError("a packed micro-batch is not topped up with padding pairs: leave pairs unset")
        if self.packed and self.pad_to_multiple_of and self.pad_to_multiple_of % self.sequence_multiple_of:
            raise ValueError(
                f"pad_to_multiple_of ({self.pad_to_multiple_of}) must be a multiple of sequence_multiple_of "
                f"({self.sequence_multiple_of})"
            )
        if not self.packed and self.seq_length is None:
            raise ValueError("a padded micro-batch needs seq_length")
        if self.pairs is not None and self.filler is None:
            raise ValueError("topping up to `pairs` needs a filler sample")


def sequence_row(prompt: np.ndarray, response: np.ndarray, pad_id: int):
    """Tokens ``x = prompt + response``, labels ``x[t + 1]`` (``pad_id`` after the last token)
    and the loss mask (1 exactly where the label is a response token)."""
    x = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))
    labels = torch.cat([x[1:], torch.tensor([pad_id])])
    mask = torch.zeros(len(x), dtype=torch.float32)
    mask[len(prompt) - 1 : len(x) - 1] = 1.0
    return x, labels, mask


def collate(samples: Sequence[PairSample], layout: BatchLayout) -> MicroBatch:
    """The micro-batch of ``samples`` in ``layout`` (see ``BatchLayout``).

    A packed micro-batch may hold no pairs (an empty micro-batch that only pads a rank's list);
    a padded one needs at least one sample, or a filler. ``num_pairs`` and ``num_tokens`` count
    ``samples`` only, never the filler.
    """
    samples = list(samples)
    real = len(samples)
    if layout.pairs is not None:
        if real > layout.pairs:
            raise ValueError(f"{real} samples do not fit a micro-batch of {layout.pairs} pairs")
        samples += [layout.filler] * (layout.pairs - real)
    if not samples and not layout.packed:
        raise ValueError("collate needs at least one sample")
    rows = [sequence_row(s["prompt"], s[key], layout.pad_id) for key in ("chosen", "rejected") for s in samples]
    packed = None
    if layout.packed:
        tokens, labels, loss_mask, position_ids, token_mask, packed = _packed(rows, layout)
    else:
        tokens, labels, loss_mask, position_ids, token_mask = _padded(rows, layout)
        pairs = len(samples)
        token_mask[real:pairs] = token_mask[pairs + real :] = 0.0  # padding pairs are padding
    return MicroBatch(
        tokens,
        labels,
        loss_mask,
        position_ids,
        num_pairs=real,
        num_tokens=sum(2 * len(s["prompt"]) + len(s["chosen"]) + len(s["rejected"]) for s in samples[:real]),
        pair_weights=None if layout.pairs is None else torch.tensor([1.0] * real + [0.0] * (layout.pairs - real)),
        packed=packed,
        reference=_reference(samples),
        token_mask=token_mask,
    )


def _reference(samples: Sequence[PairSample]) -> ReferenceScores | None:
    """The samples' reference scores in pair order; None when no sample carries them."""
    carried = [REFERENCE_KEY in s for s in samples]
    if not any(carried):
        return None
    if not all(carried):
        raise ValueError(
            f"{carried.count(False)} of {len(samples)} samples lack {REFERENCE_KEY!r}: every pair of a "
            "micro-batch needs reference scores, or none"
        )
    for s in samples:
        if np.shape(s[REFERENCE_KEY]) != (4,):
            raise ValueError(
                f"sample {REFERENCE_KEY!r} must have shape [4] (chosen_logp_sum, rejected_logp_sum, "
                f"chosen_tokens, rejected_tokens), got {np.shape(s[REFERENCE_KEY])}"
            )
    return ReferenceScores.stack([s[REFERENCE_KEY] for s in samples])


def _padded(rows, layout: BatchLayout):
    """Rows right-padded with ``pad_id`` (labels too; the mask hides them)."""
    longest = max(len(x) for x, _, _ in rows)
    if longest > layout.seq_length:
        raise ValueError(f"a sample has {longest} tokens > seq_length {layout.seq_length}: truncate it first")
    width = layout.seq_length
    if layout.pad_to_multiple_of is not None:
        width = min(round_up(longest, layout.pad_to_multiple_of), layout.seq_length)
    tokens = torch.full((len(rows), width), layout.pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), layout.pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    token_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for row, (x, y, mask) in enumerate(rows):
        tokens[row, : len(x)] = x
        labels[row, : len(x)] = y
        loss_mask[row, : len(x)] = mask
        token_mask[row, : len(x)] = 1.0
    position_ids = torch.arange(width, dtype=torch.int64).repeat(len(rows), 1)
    return tokens, labels, loss_mask, position_ids, token_mask


def _packed(rows, layout: BatchLayout):
    """Rows back to back in one row, each padded to ``sequence_multiple_of``, with a padding tail."""
    real_lengths = [len(x) for x, _, _ in rows]
    lengths = [round_up(n, layout.sequence_multiple_of) for n in real_lengths]
    used = sum(lengths)
    multiple = layout.pad_to_multiple_of or layout.sequence_multiple_of
    total = max(round_up(used, multiple), multiple)
    if total > used:
        lengths.append(total - used)
        real_lengths.append(total - used)
    tokens = torch.full((total,), layout.pad_id, dtype=torch.int64)
    labels = torch.full((total,), layout.pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(total, dtype=torch.float32)
    token_mask = torch.zeros(total, dtype=torch.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for (x, y, mask), start in zip(rows, offsets):
        tokens[start : start + len(x)] = x
        labels[start : start + len(x)] = y
        loss_mask[start : start + len(x)] = mask
        token_mask[start : start + len(x)] = 1.0
    packed = PackedLayout(
        cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(real_lengths)]).astype(np.int32)),
        max_seqlen=int(max(lengths)),
        segment_ids=torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None],
        cu_seqlens_padded=torch.from_numpy(offsets.astype(np.int32)) if layout.sequence_multiple_of > 1 else None,
    )
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    return tokens[None], labels[None], loss_mask[None], position_ids[None], token_mask[None], packed
