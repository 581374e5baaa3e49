"""Tokenizers for preference data: thin wrappers over sentencepiece and transformers.

The preprocessing tool and the trainer build the same tokenizer from the same two flags,
`--tokenizer-type` and `--tokenizer-model`, and `same_tokenizer` compares a dataset's sidecar
(`describe()`) with the run's: one definition of "the same tokenizer" for both.

- `SentencePieceTokenizer`: a SentencePiece `.model` file, as Megatron-LM's
  `--tokenizer-type SentencePieceTokenizer` takes it. Its control pieces ("<s>", "</s>") written
  in text map to their ids, as Hugging Face tokenizers do with special tokens, so text rendered
  by a chat template tokenizes as the template meant. Chat templates render with transformers'
  own renderer (`render_jinja_template`, what `apply_chat_template` calls).
- `HuggingFaceTokenizer`: `transformers.AutoTokenizer` from a local directory (or the directory
  of a `tokenizer.json`); tokenization is `tokenizer(text, add_special_tokens=False)` and chat
  templates are its own `apply_chat_template`, as TRL uses them.

`tokenize` adds no special tokens; the caller places BOS and EOS. Text that is not valid
Unicode (a lone surrogate, which a JSON "\\ud800" escape can produce) raises UnicodeEncodeError.
Only the standard library is imported here at module level: sentencepiece and transformers load
with the tokenizer that needs them, so the preprocessing tool starts fast.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
# What must agree for two tokenizers' ids to mean the same thing: the preprocessing tool's
# sidecar and training's check both compare these (the pad id and the chat template do not
# change what a stored id means).
IDENTITY_KEYS = ("type", "vocab_size", "bos_id", "eos_id", "fingerprint")

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The chat template is missing, does not parse, or failed to render the given messages."""


def same_tokenizer(theirs: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """The first `IDENTITY_KEYS` field where two `describe()` records differ, or None if they agree."""
    for key in IDENTITY_KEYS:
        if theirs.get(key) != mine.get(key):
            return key
    return None


class BaseTokenizer(ABC):
    """What the preference-data path needs from a tokenizer.

    `bos_id` / `eos_id` are None when the tokenizer has no such token (Qwen has no BOS, for
    instance). `pad_id` is the tokenizer's pad token, else EOS, else 0: padded positions are
    masked out of every loss, so any valid id serves.
    """

    name: str
    chat_template: str | None

    def __init__(self, model: str) -> None:
        self.model = model

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def _own_pad_id(self) -> int | None: ...

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """The special tokens as strings (bos_token, eos_token, ...), as chat templates see them."""

    @abstractmethod
    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no BOS/EOS added; one batched call (the tokenizer's threads)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens kept."""

    @abstractmethod
    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """Render `messages` (dicts with "role" and "content") with the chat template, as text."""

    @abstractmethod
    def _fingerprint_bytes(self) -> bytes:
        """The serialized tokenizer whose contents define the tokenization."""

    @property
    @abstractmethod
    def splits_at_spaces(self) -> bool:
        """Whether tokenization splits text into words before a space (pre-tokenization) and never
        merges across that split, so a text's ids are the ids of its part before such a space
        followed by those of the rest. The preprocessing tool then encodes a prompt's words once
        and only its last words again with each response (it checks the split on every prompt)."""

    @property
    @abstractmethod
    def added_texts(self) -> tuple[str, ...]:
        """Texts the tokenizer matches as whole tokens before it splits words (control and
        user-defined pieces, added tokens): a word split next to one may not hold."""

    @property
    def pad_id(self) -> int:
        for candidate in (self._own_pad_id, self.eos_id):
            if candidate is not None:
                return candidate
        return 0

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        return self.tokenize_batch([text])[0]

    def _no_template(self) -> ChatTemplateError:
        return ChatTemplateError(f"tokenizer {self.model!r} has no chat template; pass one (--chat-template FILE)")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: equal fingerprints mean equal tokenization."""
        return hashlib.sha256(self._fingerprint_bytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What a dataset's sidecar records about the tokenizer that wrote it."""
        template_sha = (
            hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest() if self.chat_template is not None else None
        )
        return {
            "type": self.name,
            "model": self.model,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "fingerprint": self.fingerprint,
            "chat_template_sha256": template_sha,
        }


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece `.model` file. `num_threads` is what batch encoding may use (-1: all cores)."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, chat_template: str | None = None, num_threads: int = -1) -> None:
        import sentencepiece

        super().__init__(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file!r} does not exist")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot load SentencePiece model {model_file!r}: {e}") from e
        self.num_threads = num_threads
        sp = self._sp
        self._control_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        pattern = "|".join(re.escape(p) for p in sorted(self._control_ids, key=len, reverse=True))
        self._control_re = re.compile(f"({pattern})") if pattern else None
        if chat_template is not None:
            _check_template_parses(chat_template)
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @staticmethod
    def _id_or_none(i: int) -> int | None:
        return i if i >= 0 else None

    @property
    def bos_id(self) -> int | None:
        return self._id_or_none(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._id_or_none(self._sp.eos_id())

    @property
    def _own_pad_id(self) -> int | None:
        return self._id_or_none(self._sp.pad_id())

    @property
    def special_tokens(self) -> dict[str, str]:
        ids = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_id,
            "pad_token": self._own_pad_id,
            "unk_token": self._id_or_none(self._sp.unk_id()),
        }
        return {key: self._sp.id_to_piece(i) for key, i in ids.items() if i is not None}

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        control_re = self._control_re
        if control_re is None or control_re.search("\0".join(texts)) is None:  # one scan for the usual batch
            return self._encode_plain(list(texts))
        has_control = [control_re.search(t) is not None for t in texts]
        rest = iter(self._encode_plain([t for t, control in zip(texts, has_control) if not control]))
        return [self._encode_with_controls(t) if control else next(rest) for t, control in zip(texts, has_control)]

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            return self._sp.encode(texts, num_threads=self.num_threads)
        except (RuntimeError, TypeError):
            for text in texts:
                text.encode("utf-8")  # raises UnicodeEncodeError when that is the cause
            raise

    def _encode_with_controls(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._control_re.split(text):
            if part in self._control_ids:
                ids.append(self._control_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise self._no_template()
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except Exception as e:  # jinja2 errors and the template's own raise_exception
            raise ChatTemplateError(f"chat template failed: {e}") from e
        return rendered[0]

    def _fingerprint_bytes(self) -> bytes:
        return self._sp.serialized_model_proto()

    @cached_property
    def _spec(self) -> SentencePieceSpec:
        return read_sentencepiece_spec(self._sp.serialized_model_proto())

    @cached_property
    def splits_at_spaces(self) -> bool:
        # Words start with "▁" and no piece spans one (unless whitespace is a suffix).
        return self._spec.split_by_whitespace and not self._spec.treat_whitespace_as_suffix

    @property
    def added_texts(self) -> tuple[str, ...]:
        return self._spec.added_pieces


@dataclass(frozen=True)
class SentencePieceSpec:
    """What tokenization here reads from a SentencePiece model beyond its processor's API: the
    trainer's word-split flags and the pieces matched whole (control and user-defined)."""

    split_by_whitespace: bool
    treat_whitespace_as_suffix: bool
    added_pieces: tuple[str, ...]


# Field numbers in sentencepiece_model.proto: ModelProto.pieces and .trainer_spec, the piece's
# text, score and type, TrainerSpec's two flags (proto2 defaults true and false); the piece
# types CONTROL and USER_DEFINED.
_MODEL_PIECES, _MODEL_TRAINER_SPEC = 1, 2
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_SPLIT_BY_WHITESPACE, _TREAT_WHITESPACE_AS_SUFFIX = 22, 24
_WHOLE_PIECE_TYPES = (3, 4)


def read_sentencepiece_spec(model_proto: bytes) -> SentencePieceSpec:
    """The SentencePieceSpec of a serialized ModelProto (`serialized_model_proto()`), read from the
    protobuf wire format directly, so that protobuf is not needed. A field given twice takes its
    last value, and a message given twice merges, as protobuf parses them."""
    split, suffix, added = True, False, []
    for number, value in _protobuf_fields(model_proto):
        if number == _MODEL_TRAINER_SPEC:
            for field, flag in _protobuf_fields(value):
                if field == _SPLIT_BY_WHITESPACE:
                    split = bool(flag)
                elif field == _TREAT_WHITESPACE_AS_SUFFIX:
                    suffix = bool(flag)
        elif number == _MODEL_PIECES:
            text, kind = _piece(value)
            if kind in _WHOLE_PIECE_TYPES:
                added.append(bytes(text).decode("utf-8"))
    return SentencePieceSpec(split, suffix, tuple(added))


def _piece(piece: memoryview) -> tuple[memoryview, int]:
    """A serialized SentencePiece's text and type (1, NORMAL, when not given).

    Pieces are nearly always laid out as the text (under 128 bytes), the score (a fixed32) and
    perhaps a one-byte type, in field order: that layout is read directly (a large vocabulary
    reads three times faster); any other goes through the generic reader.
    """
    n = len(piece)
    if n >= 2 and piece[0] == (_PIECE_TEXT << 3 | 2) and piece[1] < 0x80:
        pos = 2 + piece[1]
        if pos + 5 <= n and piece[pos] == (_PIECE_SCORE << 3 | 5):
            pos += 5
        if pos == n:
            return piece[2 : 2 + piece[1]], 1
        if pos + 2 == n and piece[pos] == (_PIECE_TYPE << 3) and piece[pos + 1] < 0x80:
            return piece[2 : 2 + piece[1]], piece[pos + 1]
    text, kind = memoryview(b""), 1
    for field, value in _protobuf_fields(piece):
        if field == _PIECE_TEXT:
            text = value
        elif field == _PIECE_TYPE:
            kind = value
    return text, kind


def _protobuf_fields(message: bytes | memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of each field of a serialized protobuf message, in order: varints as
    ints, length-delimited fields (strings, messages) as memoryviews, fixed-size ones as ints."""
    data = memoryview(message)
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {number})")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class HuggingFaceTokenizer(BaseTokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, ...), or its tokenizer.json.

    Loaded with `transformers.AutoTokenizer` from local files only; `chat_template` (Jinja2
    source) replaces the tokenizer's own template.
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, model: str, chat_template: str | None = None) -> None:
        super().__init__(model)
        if os.path.isdir(model):
            directory = model
        elif os.path.basename(model) == "tokenizer.json":
            directory = os.path.dirname(model) or "."
        else:
            directory = None
        if directory is None or not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            raise FileNotFoundError(
                f"no Hugging Face tokenizer at {model!r}: expected a directory with tokenizer.json "
                f"or a tokenizer.json file (slow tokenizers need converting with transformers)"
            )
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers and the Rust side raise assorted errors
            raise ValueError(f"cannot load Hugging Face tokenizer {model!r}: {e}") from e
        if not getattr(self._tok, "is_fast", False):
            raise ValueError(f"{model!r} loads as a slow tokenizer; convert it to tokenizer.json")
        if chat_template is not None:
            _check_template_parses(chat_template)
            self._tok.chat_template = chat_template

    @property
    def chat_template(self) -> str | None:  # type: ignore[override]
        template = self._tok.chat_template
        if isinstance(template, dict):  # named templates
            template = template.get("default")
        return template

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def _own_pad_id(self) -> int | None:
        return self._tok.pad_token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        return {k: v for k, v in self._tok.special_tokens_map.items() if isinstance(v, str)}

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            return self._tok(list(texts), add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError):
            for text in texts:
                text.encode("utf-8")  # raises UnicodeEncodeError when that is the cause
            raise

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise self._no_template()
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 errors and the template's own raise_exception
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def _fingerprint_bytes(self) -> bytes:
        return self._tok.backend_tokenizer.to_str().encode("utf-8")

    @cached_property
    def splits_at_spaces(self) -> bool:
        # The model tokenizes each pre-tokenized word on its own; without a pre-tokenizer BPE may
        # merge anywhere.
        pre_tokenizer = self._tok.backend_tokenizer.pre_tokenizer
        if pre_tokenizer is None:
            return False
        return any(end in (2, 3) for _, (_, end) in pre_tokenizer.pre_tokenize_str("ab cd")[:-1])

    @cached_property
    def added_texts(self) -> tuple[str, ...]:
        return tuple(token.content for token in self._tok.added_tokens_decoder.values())


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str, chat_template: str | None = None, num_threads: int = -1
) -> BaseTokenizer:
    """The tokenizer named by Megatron-style `--tokenizer-type` / `--tokenizer-model` flags.

    `chat_template` is Jinja2 source; it overrides the tokenizer's own template. `num_threads`
    bounds SentencePiece's batch-encoding threads (Hugging Face tokenizers use their own pool).
    Raises ValueError for an unknown type, a file that does not load or a chat template that
    does not parse (ChatTemplateError), FileNotFoundError for a missing file.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, chat_template, num_threads)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, chat_template)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}")


def _check_template_parses(source: str) -> None:
    """Fail at load, not at the first pair, for a template that does not compile.

    Compiles with transformers' own (cached) compiler, the one `apply_chat_template` uses.
    """
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
