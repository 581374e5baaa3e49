"""Tokenize preference pairs into a megatron-core indexed dataset (PREFIX.bin/.idx + PREFIX.meta.json).

Each pair becomes one document of three sequences, prompt, chosen, rejected: the prompt starts
with exactly one BOS (none is added when the text or chat template already starts with it) and
each response ends with EOS (--no-append-eod leaves responses as they are).

Tokenization is that of the whole conversation, as TRL's and the SimPO repository's
`build_tokenized_answer` do it: prompt + response is tokenized as one text and split where the
tokenized prompt ends, one token earlier when the prompt's last token merges with the
response's first (a "boundary merge", counted in the summary and the sidecar). So prompt +
chosen and prompt + rejected are exactly the tokenized texts.

Input: JSON Lines (any extension), a .json file holding one array, or .parquet (pyarrow).
Records hold three fields (renamed with --json-keys) in one of two shapes:
- strings: {"prompt": str, "chosen": str, "rejected": str}, tokenized as they are;
- chat messages, as UltraFeedback-style data has them: the prompt a string or a list of
  {"role", "content"} messages; chosen/rejected a string, the assistant turn(s), or the full
  conversation repeating the prompt turns (those are stripped). Rendered with the tokenizer's
  own `apply_chat_template`, its template set by --chat-template where given: the prompt is
  template(prompt, add_generation_prompt=True) and a response is what template(prompt +
  response) renders after it, its end-of-turn token(s) and EOS included as the template renders
  them (whitespace after a closing EOS is dropped, and no second EOS is added).

Bad input (malformed JSON, invalid UTF-8, missing or non-string fields, an empty prompt or
response, chosen identical to rejected, a template that cannot split the pair) stops the run
with an error naming the file and line, and writes nothing; --skip-invalid skips such pairs
and counts them by reason. Output files appear only when the run succeeds.

    simpo-preprocess --input train.jsonl --output-prefix data/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --workers 4

(`python tools/preprocess_preference_data.py` is the same command, from a checkout.)
"""

# The command: its flags, the worker pool, progress and summary. What a pair becomes is
# simpo_megatron.data.pair_encoding; reading the input is simpo_megatron.data.readers.

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from simpo_megatron.data.builder import PreferencePairWriter
from simpo_megatron.data.pair_encoding import EncodedChunk, EncoderConfig, PairEncoder, Prepared
from simpo_megatron.data.readers import Chunk, InputError, read_input
from simpo_megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

# ---- encoding, in this process or in workers ---------------------------------------------------

_worker_encoder: PairEncoder | None = None
_DRAIN_TIMEOUT_S = 60.0  # per chunk still in a worker when a run stops early (a dead worker never answers)


def _init_worker(config: EncoderConfig) -> None:
    """Each worker builds its own tokenizer; Ctrl-C and SIGTERM are the main process's to handle."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = config.encoder()


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _worker_encoder is not None, "worker not initialized"
    return _worker_encoder.encode_chunk(chunk)


@contextmanager
def _encoded_chunks(
    chunks: Iterator[Chunk], encoder: PairEncoder, config: EncoderConfig, workers: int
) -> Iterator[Iterator[EncodedChunk]]:
    """The encoded chunks in input order; with workers > 1, encoded by a process pool."""
    if workers == 1:
        yield _pipelined(chunks, encoder)
        return
    import multiprocessing  # only here: its import costs start-up time

    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        pending: deque[Any] = deque()
        try:
            yield _in_order(pool, chunks, pending, max_pending=4 * workers)
        finally:
            # Stopped early (bad input, Ctrl-C): let the chunks already sent finish before the
            # pool's terminate. Its task thread may still be writing one into the workers' pipe;
            # once the workers are killed nobody reads it, and terminate waits for that thread forever.
            for result in pending:
                result.wait(timeout=_DRAIN_TIMEOUT_S)


class _Background:
    """One call on its own thread; `result()` waits for it and returns its value or raises its error."""

    def __init__(self, function: Any, *args: Any) -> None:
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self._thread.start()

    def _run(self, function: Any, args: tuple[Any, ...]) -> None:
        try:
            self._outcome = (True, function(*args))
        except BaseException as e:  # re-raised in the caller's thread
            self._outcome = (False, e)

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _pipelined(chunks: Iterator[Chunk], encoder: PairEncoder) -> Iterator[EncodedChunk]:
    """Encode in one process: the tokenizer (which releases the GIL) runs on a thread while this
    one reads, parses and splits the neighbouring chunks."""
    pending: tuple[Prepared, _Background] | None = None
    for chunk in chunks:
        prepared = encoder.prepare(chunk)
        future = _Background(encoder.tokenize, prepared)
        if pending is not None:
            yield encoder.finish(pending[0], pending[1].result())
        pending = (prepared, future)
    if pending is not None:
        yield encoder.finish(pending[0], pending[1].result())


def _in_order(pool: Any, chunks: Iterator[Chunk], pending: deque[Any], max_pending: int) -> Iterator[EncodedChunk]:
    """Like pool.imap, but reads ahead at most max_pending chunks, so memory stays bounded;
    ``pending`` holds the results not yet yielded."""
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---- progress and summary ----------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal; elsewhere a log line every `log_interval` pairs."""

    def __init__(self, total: int | None, log_interval: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # only here: its import costs start-up time

            self.bar = tqdm(total=total, unit="pairs", file=sys.stderr, dynamic_ncols=True)
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.done = 0
        self.next_log = log_interval

    def update(self, records: int, skipped: int) -> None:
        self.done += records
        if self.bar is not None:
            self.bar.update(records)
            if skipped:
                self.bar.set_postfix(skipped=skipped, refresh=False)
        elif self.done >= self.next_log:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"processed {self.done} pairs ({rate:.0f} pairs/s), skipped {skipped}", file=sys.stderr)
            self.next_log += self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(prefix: str, meta: dict[str, Any], lengths: np.ndarray, skipped: Counter[str], seconds: float) -> str:
    lines = [
        f"wrote {meta['num_pairs']} pairs, {meta['num_tokens']} tokens ({meta['dtype']}) to "
        f"{prefix}.bin/.idx/.meta.json in {seconds:.1f} s ({meta['num_pairs'] / max(seconds, 1e-9):.0f} pairs/s)"
    ]
    merges = meta["boundary_merges"]
    if merges["responses"]:
        lines.append(
            f"boundary merges: {merges['responses']} of {2 * meta['num_pairs']} responses start with a token "
            f"merged from the prompt's last token and their first (split as TRL does); "
            f"{merges['shifted']} responses start earlier than TRL would start them, with prompt "
            f"token(s) that the other response of the pair merged"
        )
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        lines.append(f"skipped {sum(skipped.values())} pairs: {reasons}")
    lines.append(f"{'tokens':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for i, name in enumerate(("prompt", "chosen", "rejected")):
        p50, p90, p99 = np.percentile(lengths[i::3], [50, 90, 99])
        lines.append(f"{name:<10}{p50:>8.0f}{p90:>8.0f}{p99:>8.0f}{lengths[i::3].max():>8}")
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON Lines, a .json array, or .parquet")
    group.add_argument(
        "--json-keys",
        nargs=3,
        default=["prompt", "chosen", "rejected"],
        metavar=("PROMPT", "CHOSEN", "REJECTED"),
        help="names of the prompt, chosen and rejected fields",
    )
    group.add_argument("--skip-invalid", action="store_true", help="skip invalid pairs (counted by reason)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", required=True, help="SentencePiece .model file, or HF directory or tokenizer.json"
    )
    group.add_argument(
        "--chat-template",
        metavar="FILE_OR_TEMPLATE",
        help="Jinja2 chat template, a file or the template itself; sets the tokenizer's template",
    )
    group.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end each response with EOS unless it already ends with it",
    )
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=10000, help="pairs between log lines (without a terminal)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    return args


def run(args: argparse.Namespace) -> str:
    """Preprocess as the parsed flags say; returns the summary. Raises InputError."""
    return preprocess_pairs(
        args.input,
        args.output_prefix,
        args.tokenizer_type,
        args.tokenizer_model,
        chat_template=args.chat_template,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        skip_invalid=args.skip_invalid,
        workers=args.workers,
        log_interval=args.log_interval,
    )


def preprocess_pairs(
    input_path: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    *,
    chat_template: str | None = None,
    json_keys: Sequence[str] = ("prompt", "chosen", "rejected"),
    append_eod: bool = True,
    skip_invalid: bool = False,
    workers: int = 1,
    log_interval: int = 10000,
) -> str:
    """Tokenize the pairs of `input_path` into OUTPUT_PREFIX.bin/.idx/.meta.json; returns the
    summary. The arguments are the command's flags (`chat_template` a file or Jinja2 source).
    Raises InputError for bad input, and writes nothing then."""
    start = time.perf_counter()
    chat_template = _chat_template(chat_template)
    cpus = len(os.sched_getaffinity(0))
    threads = max(1, cpus // workers)  # the tokenizer's batch-encoding threads in each worker
    try:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, chat_template, threads)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer: {e}") from None
    if append_eod and tokenizer.eos_id is None:
        raise InputError(f"tokenizer {tokenizer_model!r} has no EOS token; pass --no-append-eod")
    keys = tuple(json_keys)
    config = EncoderConfig(tokenizer_type, tokenizer_model, chat_template, keys, append_eod, threads)
    encoder = PairEncoder(tokenizer, keys, append_eod)
    chunks, total, location = read_input(input_path, keys)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    skipped: Counter[str] = Counter()
    merges: Counter[str] = Counter(responses=0, shifted=0)
    metadata = {"source": input_path, "json_keys": list(keys), "append_eod": append_eod}
    # The worker pool starts before the writer opens its files, so no worker inherits them.
    with (
        _encoded_chunks(chunks, encoder, config, workers) as encoded,
        PreferencePairWriter(output_prefix, tokenizer.describe(), metadata) as writer,
    ):
        progress = _Progress(total, log_interval)
        try:
            for result in encoded:
                for failure in result.failures:
                    if failure.fatal or not skip_invalid:
                        hint = "" if failure.fatal else " (--skip-invalid skips such pairs)"
                        raise InputError(f"{location.format(failure.location)}: {failure.message}{hint}")
                    skipped[failure.reason] += 1
                merges.update(result.merges)
                if len(result.offsets) > 1:
                    writer.add_batch(result.tokens, result.offsets)
                progress.update(result.records, sum(skipped.values()))
        finally:
            progress.close()
        if writer.num_pairs == 0:
            raise InputError(f"{input_path}: no valid pairs to write")
        writer.metadata["skipped"] = dict(skipped)
        writer.metadata["boundary_merges"] = dict(merges)
        lengths = writer.sequence_lengths()
        meta = writer.close()
    return _summary(output_prefix, meta, lengths, skipped, time.perf_counter() - start)


def _chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding the template, or the Jinja2 source itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{value}: cannot read the chat template: {e}") from None
    if "{{" in value or "{%" in value:
        return value
    raise InputError(f"--chat-template {value!r} is neither a file nor a Jinja2 template")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 success, 1 bad input, 130 interrupted)."""
    args = parse_args(argv)
    try:
        print(run(args))
    except InputError as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


def command(argv: Sequence[str] | None = None) -> int:
    """`main` as a process runs it: SIGTERM stops the run as Ctrl-C does, removing its files."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return main(argv)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the writer, which removes its files
