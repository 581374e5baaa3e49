"""Preference pairs as token ids: validate a record, render its chat messages, tokenize, split.

Each pair becomes three sequences, prompt, chosen, rejected: the prompt starts with exactly one
BOS (none is added when the text or chat template already starts with it) and each response
ends with EOS (unless `append_eod` is off, which leaves responses as they are).

Tokenization is that of the whole conversation, as TRL's and the SimPO repository's
`build_tokenized_answer` do it: prompt + response is tokenized as one text and split where the
tokenized prompt ends, one token earlier when the prompt's last token merges with the
response's first (a "boundary merge", counted per chunk). So prompt + chosen and prompt +
rejected are exactly the tokenized texts (`split_pair`). When the tokenizer splits words at
spaces, each prompt is encoded once, and each response from its own first word or from the
prompt's last words (the same ids; see PairEncoder). Texts are encoded in batches with the
tokenizer's own threads.

Records hold three fields (named by `keys`) in one of two shapes:
- strings: {"prompt": str, "chosen": str, "rejected": str}, tokenized as they are;
- chat messages, as UltraFeedback-style data has them: the prompt a string or a list of
  {"role", "content"} messages; chosen/rejected a string, the assistant turn(s), or the full
  conversation repeating the prompt turns (those are stripped). Rendered with the tokenizer's
  own `apply_chat_template`: the prompt is template(prompt, add_generation_prompt=True) and a
  response is what template(prompt + response) renders after it, its end-of-turn token(s) and
  EOS included as the template renders them (whitespace after a closing EOS is dropped, and no
  second EOS is added).
A record that cannot be used is a Failure in its chunk's result, with the PairError's reason.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from simpo_megatron.data.readers import Chunk, PairError, json_type, parse_line, parse_lines, record_field
from simpo_megatron.data.tokenizers import BaseTokenizer, ChatTemplateError, Message, build_tokenizer


@dataclass(frozen=True)
class EncoderConfig:
    """What a worker process needs to build its own PairEncoder."""

    tokenizer_type: str
    tokenizer_model: str
    chat_template: str | None
    keys: tuple[str, str, str]
    append_eod: bool
    num_threads: int

    def encoder(self) -> PairEncoder:
        tokenizer = build_tokenizer(self.tokenizer_type, self.tokenizer_model, self.chat_template, self.num_threads)
        return PairEncoder(tokenizer, self.keys, self.append_eod)


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
        start = next(
            (i for i, (a, b) in enumerate(zip(chosen_full, rejected_full)) if a != b),
            min(len(chosen_full), len(rejected_full)),
        )
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
        values = [None] * len(chunk.records) if strict else parse_lines(chunk.records)
        for location, record, value in zip(chunk.locations, chunk.records, values):
            texts = None
            if value is not None:
                try:
                    prompt, chosen, rejected = value[k_prompt], value[k_chosen], value[k_rejected]
                except (TypeError, KeyError, IndexError):
                    pass  # the slow path names the problem
                else:
                    if (
                        type(prompt) is str
                        and type(chosen) is str
                        and type(rejected) is str
                        and prompt.strip()
                        and chosen.strip()
                        and rejected.strip()
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
            record = parse_line(record)
        if not isinstance(record, dict):
            raise PairError("bad_type", f"expected a JSON object, got {json_type(record)}")
        prompt, chosen, rejected = (record_field(record, key) for key in self.keys)
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
                "the pair holds chat messages but the tokenizer has no chat template; pass --chat-template FILE",
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
