"""Tokenize preference pairs into a megatron-core indexed dataset (PREFIX.bin/.idx + PREFIX.meta.json).

Each pair becomes one document of three sequences, prompt, chosen, rejected (design.md): the
prompt starts with exactly one BOS (none is added when the text or chat template already
starts with it) and each response ends with EOS (--no-append-eod leaves responses as they are).

Tokenization is that of the whole conversation, as TRL's and the SimPO repository's
`build_tokenized_answer` do it: prompt + response is tokenized as one text and split where the
tokenized prompt ends, one token earlier when the prompt's last token merges with the
response's first (a "boundary merge", counted in the summary and the sidecar). So prompt +
chosen and prompt + rejected are exactly the tokenized texts. When the tokenizer splits words
at spaces, each prompt is encoded once, and each response from its own first word or from the
prompt's last words (the same ids; see PairEncoder). Texts are encoded in batches with the
tokenizer's own threads.

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

    python tools/preprocess_preference_data.py --input train.jsonl --output-prefix data/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --workers 4
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import signal
import string
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# Like Megatron-LM's tools: run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpo_megatron.data.builder import PreferencePairWriter  # noqa: E402
from simpo_megatron.data.tokenizers import (  # noqa: E402
    TOKENIZER_TYPES,
    BaseTokenizer,
    ChatTemplateError,
    Message,
    build_tokenizer,
)

# A batch handed to a worker and to the builder: at most CHUNK_PAIRS pairs, and for JSON Lines
# about CHUNK_BYTES of input at most (plus one line), so that long pairs keep memory bounded.
CHUNK_PAIRS = 4096
CHUNK_BYTES = 2 << 20


class InputError(Exception):
    """Stops the run; the message names the file and where in it."""


class PairError(Exception):
    """One pair is unusable, for `reason`: malformed_json, invalid_utf8, bad_type, missing_field,
    empty_prompt, empty_response, identical_responses or chat_template. `fatal` errors stop the
    run even with --skip-invalid."""

    def __init__(self, reason: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True)
class EncoderConfig:
    """What a worker process needs to build its own PairEncoder."""

    tokenizer_type: str
    tokenizer_model: str
    chat_template: str | None
    keys: tuple[str, str, str]
    append_eod: bool
    num_threads: int


@dataclass
class Chunk:
    """Consecutive records: raw JSONL lines (parsed by the worker) or parsed records."""

    locations: list[int]  # line numbers (JSONL) or record indices
    records: list[Any]


@dataclass
class Prepared:
    """A chunk's valid records as texts to tokenize: the prompts and the responses that follow them."""

    chunk: Chunk
    locations: list[int]
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    failures: list[Failure]
    fast_path: bool = True


class Tokenized(NamedTuple):
    """A pair's ids: the prompt's, and prompt + chosen and prompt + rejected from token `head` on
    (their first `head` ids are the prompt's)."""

    prompt: list[int]
    head: int
    chosen: list[int]
    rejected: list[int]


class Failure(NamedTuple):
    """A PairError as data, to cross process boundaries (exceptions do not pickle faithfully)."""

    location: int
    reason: str
    message: str
    fatal: bool


@dataclass
class EncodedChunk:
    """The valid pairs of a chunk as the builder takes them, the failures in input order, and
    the boundary merges ("responses" merged with the prompt's last token, "shifted" responses that
    start before TRL's boundary: see split_pair)."""

    tokens: np.ndarray
    offsets: np.ndarray
    records: int
    failures: list[Failure]
    merges: Counter[str]


def response_start(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Where a response starts in the tokenized prompt + response, by TRL's and the SimPO
    repository's `build_tokenized_answer`: after the prompt's tokens, or one token earlier when
    the prompt's last token merged with the response's first (the merged token then belongs to
    the response)."""
    n = len(prompt_ids)
    return n if full_ids[:n] == prompt_ids else n - 1


def split_pair(
    prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int]
) -> tuple[list[int], list[int], list[int], int, int]:
    """(prompt, chosen, rejected, merged, shifted) from the tokenized prompt and the two tokenized
    full texts, so that prompt + chosen and prompt + rejected are exactly those full tokenizations.

    Each response starts where TRL starts it (`response_start`); the one prompt both share ends at
    the earlier of the two starts, and within their common prefix. `merged` counts the responses
    whose first token merged with the prompt's; `shifted` those that start earlier than TRL's
    boundary because of the other (TRL keeps one prompt per response and counts that token as
    prompt; the layout here has one prompt per pair).
    """
    n = len(prompt_ids)
    chosen_start, rejected_start = response_start(prompt_ids, chosen_full), response_start(prompt_ids, rejected_full)
    start = min(chosen_start, rejected_start)
    if chosen_full[:start] != rejected_full[:start]:
        # The prompt's tokens changed beyond its last one (TRL tolerates one such token): their
        # common prefix, which may be all of the shorter (its response is then empty, an error).
        start = next((i for i, (a, b) in enumerate(zip(chosen_full, rejected_full)) if a != b),
                     min(len(chosen_full), len(rejected_full)))
    merged = (chosen_start < n) + (rejected_start < n)
    shifted = (chosen_start > start) + (rejected_start > start)
    return chosen_full[:start], chosen_full[start:], rejected_full[start:], merged, shifted


# A space and an ASCII letter or digit: a word start; a prompt ending in printable ASCII other
# than a space ends a word there.
_WORD_STARTS = frozenset(" " + c for c in string.ascii_letters + string.digits)
_PLAIN_ENDS = frozenset(c for c in string.printable if not c.isspace())


def tail_start(prompt: str, skip: int) -> int:
    """Where a prompt's last words start, the part encoded again with each response: at the last
    space between a non-space and an ASCII letter or digit (`skip` characters after it); 0 (the
    whole prompt) when there is no such space."""
    space = prompt.rfind(" ")
    while space > 0:
        after = prompt[space + 1 : space + 2]
        if after.isascii() and after.isalnum() and not prompt[space - 1].isspace():
            return space + skip
        space = prompt.rfind(" ", 0, space)
    return 0


class PairEncoder:
    """Validates records, renders them (chat template if they hold messages) and tokenizes them:
    prompt and prompt + response as one text each, split at the prompt's token boundary.

    Encoding each prompt three times (alone and before each response) would be most of the
    work. When the tokenizer splits words at spaces (`splits_at_spaces`), prompt + response is
    encoded as the prompt's ids up to a word start followed by the ids of the text from there
    (`resume_at`): the same ids, since nothing merges across the split. The word start is the
    response's own first word when both responses start with one after a plain ASCII prompt end
    (" 42" after "Answer:", as plain-text pairs have it) and the tokenizer keeps such a space
    with the word after it (checked once, on probes); else the prompt's last words
    (`tail_start`), and each such prompt checks the split: its own ids must end with those of
    its last words, else its pair is encoded whole.
    """

    def __init__(self, tokenizer: BaseTokenizer, keys: tuple[str, str, str], append_eod: bool) -> None:
        self.tokenizer = tokenizer
        self.keys = keys
        self.append_eod = append_eod
        self._eos_token = tokenizer.special_tokens.get("eos_token")
        self._tail_skip = self._tail_variant() if tokenizer.splits_at_spaces else None
        self._at_response = self._tail_skip is not None and self._splits_before_responses()
        self._added_texts = tokenizer.added_texts

    def _tail_variant(self) -> int | None:
        """Whether a prompt's last words are encoded with the space before them (0: byte-level BPE,
        SentencePiece removing extra whitespace) or without (1: SentencePiece adding "▁" to a text
        but keeping whitespace, as Llama-2's does); None when neither gives the ids of the whole."""
        probes = ("ab cd", "Answer: 42", "x, y z")
        for skip in (0, 1):
            texts = [text[tail_start(text, skip) :] for text in probes]
            ids = self.tokenizer.tokenize_batch([*probes, *texts])
            if all(tail and full[-len(tail) :] == tail for full, tail in zip(ids, ids[len(probes) :])):
                return skip
        return None

    def _splits_before_responses(self) -> bool:
        """Whether a prompt's ids followed by those of a response from its first word (the
        `_tail_skip` variant) are the ids of prompt + response, on probes: false where the space
        joins the word before it (a pre-tokenizer splitting with "merged_with_previous")."""
        probes = (("Answer:", " 42"), ("ab", " cd"), ("x, y", " z 7"), ("Sure!", " Hi 19"))
        skip = self._tail_skip
        ids = self.tokenizer.tokenize_batch(
            [p for p, _ in probes] + [r[skip:] for _, r in probes] + [p + r for p, r in probes]
        )
        n = len(probes)
        return all(ids[i] + ids[n + i] == ids[2 * n + i] for i in range(n))

    def resume_at(self, prompts: list[str], chosen: list[str], rejected: list[str]) -> list[int]:
        """Where in prompt + response the encoding of each pair's responses starts: past the
        prompt at the responses' first word, at the prompt's last words, or at 0 (the whole text)."""
        skip = self._tail_skip
        if skip is None:
            return [0] * len(prompts)
        words, ends, added = _WORD_STARTS, _PLAIN_ENDS, self._added_texts
        return [
            len(p) + skip
            if self._at_response and c[:2] in words and r[:2] in words and p[-1:] in ends and not p.endswith(added)
            else tail_start(p, skip)
            for p, c, r in zip(prompts, chosen, rejected)
        ]

    def encode_chunk(self, chunk: Chunk) -> EncodedChunk:
        """Validate, render, tokenize and split a chunk (the three stages below, in turn)."""
        prepared = self.prepare(chunk)
        return self.finish(prepared, self.tokenize(prepared))

    def prepare(self, chunk: Chunk, strict: bool = False) -> Prepared:
        """The texts of a chunk's valid records and the failures of the others.

        Plain-text records take a fast path that leaves the Unicode check to the tokenizer;
        `strict` checks every record fully (what `tokenize` falls back to when the tokenizer
        rejects a text).
        """
        prepared = Prepared(chunk, [], [], [], [], [], fast_path=not strict)
        eos_token = self._eos_token
        k_prompt, k_chosen, k_rejected = self.keys
        values = [None] * len(chunk.records) if strict else _parsed(chunk.records)
        for location, record, value in zip(chunk.locations, chunk.records, values):
            texts = None
            if value is not None:
                try:
                    prompt, chosen, rejected = value[k_prompt], value[k_chosen], value[k_rejected]
                except (TypeError, KeyError, IndexError):
                    pass  # the slow path names the problem
                else:
                    if (
                        type(prompt) is str and type(chosen) is str and type(rejected) is str
                        and prompt.strip() and chosen.strip() and rejected.strip()
                        and not (eos_token and (eos_token in chosen or eos_token in rejected))
                    ):
                        texts = (prompt, chosen, rejected)
            if texts is None:
                try:
                    texts = self.texts(record)
                except PairError as e:
                    prepared.failures.append(Failure(location, e.reason, e.message, e.fatal))
                    continue
            prepared.locations.append(location)
            prepared.prompts.append(texts[0])
            prepared.chosen.append(texts[1])
            prepared.rejected.append(texts[2])
        return prepared

    def tokenize(self, prepared: Prepared) -> list[Tokenized]:
        """Token ids of each prompt and of prompt + chosen and prompt + rejected, in one batch."""
        try:
            return self._tokenize(prepared)
        except (UnicodeEncodeError, RuntimeError, TypeError, ValueError):
            if not prepared.fast_path:
                raise
            strict = self.prepare(prepared.chunk, strict=True)  # finds the text the tokenizer rejected
            vars(prepared).update(vars(strict))
            return self._tokenize(prepared)

    def _tokenize(self, prepared: Prepared) -> list[Tokenized]:
        prompts, chosen, rejected = prepared.prompts, prepared.chosen, prepared.rejected
        k = len(prompts)
        starts = self.resume_at(prompts, chosen, rejected)
        # The prompt's text from `start` on, or how much of each response to leave out.
        tails = [prompt[start:] for prompt, start in zip(prompts, starts)]
        past = [max(0, start - len(prompt)) for prompt, start in zip(prompts, starts)]
        cut = [i for i, tail in enumerate(tails) if tail and starts[i]]
        ids = self.tokenizer.tokenize_batch(
            prompts
            + [tails[i] for i in cut]
            + [tail + text[skip:] for tail, text, skip in zip(tails, chosen, past)]
            + [tail + text[skip:] for tail, text, skip in zip(tails, rejected, past)]
        )
        m = k + len(cut)
        prompt_ids, chosen_ids, rejected_ids = ids[:k], ids[m : m + k], ids[m + k :]
        # Past the prompt, the responses' ids follow all of the prompt's.
        heads = [len(own) if start >= len(prompt) else 0 for own, prompt, start in zip(prompt_ids, prompts, starts)]
        whole = []  # prompts whose ids do not end with those of their last words
        for i, tail in zip(cut, ids[k:m]):
            head = len(prompt_ids[i]) - len(tail)
            if tail and head >= 0 and prompt_ids[i][head:] == tail:
                heads[i] = head
            else:
                whole.append(i)
        if whole:
            again = self.tokenizer.tokenize_batch(
                [prompts[i] + chosen[i] for i in whole] + [prompts[i] + rejected[i] for i in whole]
            )
            for j, i in enumerate(whole):
                chosen_ids[i], rejected_ids[i], heads[i] = again[j], again[len(whole) + j], 0
        return list(map(Tokenized, prompt_ids, heads, chosen_ids, rejected_ids))

    def finish(self, prepared: Prepared, tokenized: list[Tokenized]) -> EncodedChunk:
        """Split each pair at its prompt's token boundary, place BOS/EOS, and flatten the chunk."""
        failures = prepared.failures
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        eos = [self.tokenizer.eos_id] if self.append_eod else []
        tokens: list[int] = []
        lengths: list[int] = []
        merged_total = shifted_total = 0
        for location, (prompt, head, chosen, rejected) in zip(prepared.locations, tokenized):
            merged = shifted = 0
            if head < len(prompt):  # split_pair on the ids after the shared head, shifted by `head`
                tail = prompt[head:]
                n = len(tail)
                if chosen[:n] == tail and rejected[:n] == tail:  # no boundary merge
                    chosen, rejected = chosen[n:], rejected[n:]
                else:
                    tail, chosen, rejected, merged, shifted = split_pair(tail, chosen, rejected)
                    prompt = prompt[:head] + tail
            if bos and prompt[:1] != bos:
                prompt = bos + prompt
            if eos:
                if chosen[-1:] != eos:
                    chosen = chosen + eos
                if rejected[-1:] != eos:
                    rejected = rejected + eos
            if not (prompt and chosen and rejected and chosen != rejected):
                problem = self._problem(prompt, chosen, rejected)
                failures.append(Failure(location, problem.reason, problem.message, problem.fatal))
                continue
            merged_total += merged
            shifted_total += shifted
            tokens += prompt
            tokens += chosen
            tokens += rejected
            lengths += (len(prompt), len(chosen), len(rejected))
        failures.sort(key=lambda f: f.location)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return EncodedChunk(
            np.array(tokens, dtype=np.int32),
            offsets,
            len(prepared.chunk.records),
            failures,
            Counter(responses=merged_total, shifted=shifted_total),
        )

    def _problem(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> PairError:
        if not prompt:
            return PairError("empty_prompt", f"field {self.keys[0]!r} tokenizes to nothing")
        for key, ids in zip(self.keys[1:], (chosen, rejected)):
            if not ids:
                return PairError("empty_response", f"field {key!r} tokenizes to nothing")
        return PairError("identical_responses", f"fields {self.keys[1]!r} and {self.keys[2]!r} are identical")

    def texts(self, record: Any) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) texts of a record, rendered; raises PairError."""
        if isinstance(record, bytes):
            record = _parse_line(record)
        if not isinstance(record, dict):
            raise PairError("bad_type", f"expected a JSON object, got {_json_type(record)}")
        prompt, chosen, rejected = (_field(record, key) for key in self.keys)
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            texts = self._texts(prompt, chosen, rejected)
        else:
            texts = self._rendered(prompt, chosen, rejected)
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = e.object[e.start : e.end].encode("unicode_escape").decode()
                raise PairError("invalid_utf8", f"text holds {bad}, a lone surrogate, not valid UTF-8") from None
        if self._eos_token:
            # The template closed the turn with EOS: end the response there.
            texts = (texts[0], *(t.rstrip() if t.rstrip().endswith(self._eos_token) else t for t in texts[1:]))
        return texts

    def _texts(self, prompt: str, chosen: str, rejected: str) -> tuple[str, str, str]:
        if not prompt.strip():
            raise PairError("empty_prompt", f"field {self.keys[0]!r} is empty")
        for key, text in zip(self.keys[1:], (chosen, rejected)):
            if not text.strip():
                raise PairError("empty_response", f"field {key!r} is empty")
        return prompt, chosen, rejected

    def _rendered(
        self, prompt: str | list[Message], chosen: str | list[Message], rejected: str | list[Message]
    ) -> tuple[str, str, str]:
        if self.tokenizer.chat_template is None:
            raise PairError(
                "chat_template",
                "the pair holds chat messages but the tokenizer has no chat template; "
                "pass --chat-template FILE",
                fatal=True,
            )
        prompt_turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not any(turn["content"].strip() for turn in prompt_turns):
            raise PairError("empty_prompt", f"field {self.keys[0]!r} is empty")
        try:
            prompt_text = self.tokenizer.apply_chat_template(prompt_turns, add_generation_prompt=True)
            responses = []
            for key, value in zip(self.keys[1:], (chosen, rejected)):
                turns = self._response_turns(key, value, prompt_turns)
                full = self.tokenizer.apply_chat_template(prompt_turns + turns, add_generation_prompt=False)
                if not full.startswith(prompt_text):
                    raise PairError(
                        "chat_template",
                        f"the chat template renders the prompt differently once {key!r} follows it, "
                        f"so the two cannot be split",
                    )
                responses.append(full[len(prompt_text) :])
        except ChatTemplateError as e:
            raise PairError("chat_template", str(e)) from None
        return prompt_text, responses[0], responses[1]

    def _response_turns(self, key: str, value: str | list[Message], prompt_turns: list[Message]) -> list[Message]:
        """The assistant turn(s) of a response, the prompt turns stripped when it repeats them."""
        if isinstance(value, str):
            turns = [{"role": "assistant", "content": value}]
        elif value[: len(prompt_turns)] == prompt_turns:
            turns = value[len(prompt_turns) :]
        else:
            turns = value
        if not any(turn["content"].strip() for turn in turns):
            raise PairError("empty_response", f"field {key!r} has no response")
        if turns[0]["role"] != "assistant":
            raise PairError(
                "bad_type",
                f"field {key!r} neither repeats the prompt turns nor starts with an assistant turn "
                f"(its first response turn has role {turns[0]['role']!r})",
            )
        return turns


def _parsed(records: list[Any]) -> list[Any]:
    """Each record's value: a JSON Lines line parsed (None where it does not parse), a record
    already parsed as it is. A chunk of lines parses in one call when every line holds one value."""
    if not all(type(record) is bytes for record in records):
        return [_loads(r) if type(r) is bytes else r for r in records]
    try:
        values = json.loads((b"[" + b",".join(records) + b"]").decode())
        if len(values) == len(records):  # no line held two values, or none
            return values
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        pass
    return list(map(_loads, records))


def _loads(line: bytes) -> Any:
    """A line's value, or None when it does not parse (the slow path names the problem)."""
    try:
        return json.loads(line.decode())
    except ValueError:
        return None


def _parse_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PairError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PairError("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _field(record: dict[str, Any], key: str) -> str | list[Message]:
    """A field that must be a string or a list of {"role": str, "content": str} messages."""
    if key not in record:
        raise PairError("missing_field", f"field {key!r} is missing")
    value = record[key]
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PairError("bad_type", f"field {key!r} must be a string or a list of messages, got {_json_type(value)}")
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise PairError("bad_type", f"field {key!r}[{i}] must be an object with string 'role' and 'content'")
    return value


# ---- reading the input ------------------------------------------------------------------------


def _read_input(path: str, keys: Sequence[str]) -> tuple[Iterator[Chunk], int | None, str]:
    """The chunks of PATH, the number of records when known, and how to name a record in errors."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if path.endswith(".parquet"):
        table_rows, chunks = _parquet_chunks(path, keys)
        return chunks, table_rows, path + ": row {}"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    if path.endswith(".json") and head.startswith(b"["):
        records = _load_json_array(path)
        return _chunked(list(range(len(records))), records), len(records), path + ": record {}"
    return _jsonl_chunks(path), None, path + ":{}"


def _jsonl_chunks(path: str) -> Iterator[Chunk]:
    with open(path, "rb") as f:
        number = 1  # of the next line
        while lines := f.readlines(CHUNK_BYTES):
            if number == 1:
                lines[0] = lines[0].removeprefix(codecs.BOM_UTF8)
            locations: Sequence[int] = range(number, number + len(lines))
            number += len(lines)
            if not lines[0] or any(map(bytes.isspace, lines)):  # blank lines (a first one may be just a BOM)
                kept = [i for i, line in enumerate(lines) if line.strip()]
                locations, lines = [locations[i] for i in kept], [lines[i] for i in kept]
            for start in range(0, len(lines), CHUNK_PAIRS):
                yield Chunk(list(locations[start : start + CHUNK_PAIRS]), lines[start : start + CHUNK_PAIRS])


def _load_json_array(path: str) -> list[Any]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON array of pairs, or JSON Lines")
    return records


def _parquet_chunks(path: str, keys: Sequence[str]) -> tuple[int, Iterator[Chunk]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise InputError(f"{path}: cannot read Parquet: {e}") from None
    columns = [key for key in keys if key in parquet.schema_arrow.names]

    def chunks() -> Iterator[Chunk]:
        start = 0
        for batch in parquet.iter_batches(batch_size=CHUNK_PAIRS, columns=columns):
            records = batch.to_pylist()
            yield Chunk(list(range(start, start + len(records))), records)
            start += len(records)

    return parquet.metadata.num_rows, chunks()


def _chunked(locations: list[int], records: list[Any]) -> Iterator[Chunk]:
    for start in range(0, len(records), CHUNK_PAIRS):
        yield Chunk(locations[start : start + CHUNK_PAIRS], records[start : start + CHUNK_PAIRS])


# ---- encoding, in this process or in workers ---------------------------------------------------

_worker_encoder: PairEncoder | None = None


def _init_worker(config: EncoderConfig) -> None:
    """Each worker builds its own tokenizer; Ctrl-C and SIGTERM are the main process's to handle."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, config.chat_template, config.num_threads)
    _worker_encoder = PairEncoder(tokenizer, config.keys, config.append_eod)


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
        yield _in_order(pool, chunks, max_pending=4 * workers)


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


def _in_order(pool: Any, chunks: Iterator[Chunk], max_pending: int) -> Iterator[EncodedChunk]:
    """Like pool.imap, but reads ahead at most max_pending chunks, so memory stays bounded."""
    pending: deque[Any] = deque()
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
    """Preprocess as `args` say; returns the summary. Raises InputError."""
    start = time.perf_counter()
    chat_template = _chat_template(args.chat_template)
    cpus = len(os.sched_getaffinity(0))
    threads = max(1, cpus // args.workers)  # the tokenizer's batch-encoding threads in each worker
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, chat_template, threads)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer: {e}") from None
    if args.append_eod and tokenizer.eos_id is None:
        raise InputError(f"tokenizer {args.tokenizer_model!r} has no EOS token; pass --no-append-eod")
    keys = tuple(args.json_keys)
    config = EncoderConfig(args.tokenizer_type, args.tokenizer_model, chat_template, keys, args.append_eod, threads)
    encoder = PairEncoder(tokenizer, keys, args.append_eod)
    chunks, total, location = _read_input(args.input, keys)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)

    skipped: Counter[str] = Counter()
    merges: Counter[str] = Counter(responses=0, shifted=0)
    metadata = {"source": args.input, "json_keys": list(keys), "append_eod": args.append_eod}
    # The worker pool starts before the writer opens its files, so no worker inherits them.
    with (
        _encoded_chunks(chunks, encoder, config, args.workers) as encoded,
        PreferencePairWriter(args.output_prefix, tokenizer.describe(), metadata) as writer,
    ):
        progress = _Progress(total, args.log_interval)
        try:
            for result in encoded:
                for failure in result.failures:
                    if failure.fatal or not args.skip_invalid:
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
            raise InputError(f"{args.input}: no valid pairs to write")
        writer.metadata["skipped"] = dict(skipped)
        writer.metadata["boundary_merges"] = dict(merges)
        lengths = writer.sequence_lengths()
        meta = writer.close()
    return _summary(args.output_prefix, meta, lengths, skipped, time.perf_counter() - start)


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


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the writer, which removes its files


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
