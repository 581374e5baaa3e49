"""Reading preference pairs: an input file as chunks of records, and the checks on one record.

Input is JSON Lines (any extension), a .json file holding one array, or .parquet (pyarrow).
A chunk holds at most CHUNK_PAIRS records, and for JSON Lines about CHUNK_BYTES of input at
most (plus one line), so that long pairs keep memory bounded. JSON Lines stay raw bytes in a
chunk: the process that encodes the chunk parses them (`parse_lines`, `parse_line`).

A record holds three fields, each a string or a list of {"role": str, "content": str} chat
messages (`record_field`). A problem with one record is a PairError, named by `reason`; a
problem with the file as a whole is an InputError.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from simpo_megatron.data.tokenizers import Message

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


@dataclass
class Chunk:
    """Consecutive records: raw JSONL lines (parsed by the worker) or parsed records."""

    locations: list[int]  # line numbers (JSONL) or record indices
    records: list[Any]


def read_input(path: str, keys: Sequence[str]) -> tuple[Iterator[Chunk], int | None, str]:
    """The chunks of PATH, the number of records when known, and how to name a record in errors
    (a format string taking the chunk's location). Raises InputError."""
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
        raise InputError("reading Parquet needs pyarrow: pip install 'simpo-megatron[parquet]'") from None
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


# ---- one record -------------------------------------------------------------------------------


def parse_lines(records: list[Any]) -> list[Any]:
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
    """A line's value, or None when it does not parse (`parse_line` names the problem)."""
    try:
        return json.loads(line.decode())
    except ValueError:
        return None


def parse_line(line: bytes) -> Any:
    """A JSON Lines line's value; raises PairError naming what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PairError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PairError("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})") from None


def json_type(value: Any) -> str:
    """How an error message names the JSON type of `value`."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def record_field(record: dict[str, Any], key: str) -> str | list[Message]:
    """A field that must be a string or a list of {"role": str, "content": str} messages; raises PairError."""
    if key not in record:
        raise PairError("missing_field", f"field {key!r} is missing")
    value = record[key]
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PairError("bad_type", f"field {key!r} must be a string or a list of messages, got {json_type(value)}")
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise PairError("bad_type", f"field {key!r}[{i}] must be an object with string 'role' and 'content'")
    return value
