"""Tokenizers for preference data: SentencePiece models and Hugging Face `tokenizer.json` files.

Self-contained (sentencepiece, tokenizers and jinja2; no transformers, no megatron) so that the
preprocessing tool and the trainer build the same tokenizer from the same two flags,
`--tokenizer-type` and `--tokenizer-model`, and compare it with a dataset's sidecar through
`describe()`.

Conventions:
- `tokenize(text)` adds no special tokens; the caller places BOS and EOS. Special-token strings
  that appear in the text ("<s>", "<|im_end|>", ...) map to their ids, as Hugging Face tokenizers
  do, so that text rendered by a chat template tokenizes as the template meant.
- `tokenize` raises UnicodeEncodeError for text that is not valid Unicode (a lone surrogate,
  which a JSON "\\ud800" escape can produce).
- Chat templates are Jinja2, rendered the way transformers' `apply_chat_template` renders them
  (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`, a non-escaping `tojson`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The chat template is missing, or failed to render the given messages."""


class BaseTokenizer(ABC):
    """What the preference-data path needs from a tokenizer.

    `bos_id` / `eos_id` are None when the tokenizer has no such token (Qwen has no BOS, for
    instance). `pad_id` is the tokenizer's pad token, else EOS, else 0: padded positions are
    masked out of every loss, so any valid id serves.
    """

    name: str

    def __init__(self, model: str) -> None:
        self.model = model
        self.chat_template: str | None = None
        self._template: jinja2.Template | None = None

    def _set_chat_template(self, source: str | None) -> None:
        """Use `source` (Jinja2) as the chat template; a template that does not parse fails here."""
        self.chat_template = source
        self._template = None if source is None else _compile_chat_template(source)

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
        """The special tokens as strings (bos_token, eos_token, ...); chat templates see these."""

    @property
    @abstractmethod
    def _model_file(self) -> str:
        """The file whose contents define the tokenization (for the fingerprint)."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens kept."""

    @property
    def pad_id(self) -> int:
        for candidate in (self._own_pad_id, self.eos_id):
            if candidate is not None:
                return candidate
        return 0

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        try:
            return self._encode(text)
        except (RuntimeError, TypeError):
            text.encode("utf-8")  # raises UnicodeEncodeError when that is the cause
            raise

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """Render `messages` (dicts with "role" and "content") with the chat template."""
        if self._template is None:
            raise ChatTemplateError(
                f"tokenizer {self.model!r} has no chat template; pass one (--chat-template FILE)"
            )
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the model file: equal fingerprints mean equal tokenization."""
        with open(self._model_file, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def describe(self) -> dict[str, Any]:
        """What a dataset's sidecar records about the tokenizer that wrote it."""
        template_sha = (
            hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest()
            if self.chat_template is not None
            else None
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
    """A SentencePiece `.model` file. Its control pieces (<s>, </s>, ...) in text map to their ids."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, chat_template: str | None = None) -> None:
        super().__init__(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file!r} does not exist")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot load SentencePiece model {model_file!r}: {e}") from e
        controls = [
            self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)
        ]
        self._control_ids = {piece: self._sp.piece_to_id(piece) for piece in controls}
        self._control_re = (
            re.compile("(" + "|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True)) + ")")
            if controls
            else None
        )
        self._set_chat_template(chat_template)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _id_or_none(self, i: int) -> int | None:
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
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self._own_pad_id}
        names["unk_token"] = self._id_or_none(self._sp.unk_id())
        return {k: self._sp.id_to_piece(i) for k, i in names.items() if i is not None}

    @property
    def _model_file(self) -> str:
        return self.model

    def _encode(self, text: str) -> list[int]:
        if self._control_re is None or self._control_re.search(text) is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for part in self._control_re.split(text):
            if part in self._control_ids:
                ids.append(self._control_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class HuggingFaceTokenizer(BaseTokenizer):
    """A Hugging Face fast tokenizer: a directory holding tokenizer.json, or that file itself.

    Special tokens and the chat template come from tokenizer_config.json beside it (and from
    chat_template.jinja, where newer transformers versions save the template).
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, model: str, chat_template: str | None = None) -> None:
        super().__init__(model)
        if os.path.isdir(model):
            directory, json_path = model, os.path.join(model, "tokenizer.json")
        else:
            directory, json_path = os.path.dirname(model), model
        if not os.path.isfile(json_path):
            raise FileNotFoundError(
                f"no Hugging Face tokenizer at {model!r}: expected a directory with tokenizer.json "
                f"or a tokenizer.json file (slow tokenizers need converting with transformers)"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(json_path)
        except Exception as e:  # the Rust side raises a plain Exception
            raise ValueError(f"cannot load Hugging Face tokenizer {json_path!r}: {e}") from e
        self._json_path = json_path
        config_path = os.path.join(directory, "tokenizer_config.json")
        config: dict[str, Any] = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        self._tokens = {
            key: token
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (token := _token_content(config.get(key))) is not None
        }
        for key, token in self._tokens.items():
            if self._tok.token_to_id(token) is None:
                raise ValueError(f"{config_path}: {key} {token!r} is not in the vocabulary")
        self._set_chat_template(chat_template if chat_template is not None else _template_from(directory, config))

    def _token_id(self, key: str) -> int | None:
        token = self._tokens.get(key)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def _own_pad_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._tokens)

    @property
    def _model_file(self) -> str:
        return self._json_path

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str, chat_template: str | None = None
) -> BaseTokenizer:
    """The tokenizer named by Megatron-style `--tokenizer-type` / `--tokenizer-model` flags.

    `chat_template` is Jinja2 source; it overrides the tokenizer's own template.
    Raises ValueError for an unknown type, a file that does not load or a chat template that
    does not parse (ChatTemplateError), FileNotFoundError for a missing file.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, chat_template)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, chat_template)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}")


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from(directory: str, config: dict[str, Any]) -> str | None:
    """The chat template saved with a Hugging Face tokenizer, if any."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
