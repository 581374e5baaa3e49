"""Chat templates of the model families users train, tokenized as the whole conversation.

Llama-3, Mistral-instruct, Qwen2 (with its default system prompt) and Gemma templates, given here
as strings, on a byte-level BPE tokenizer (transformers) and a SentencePiece model, both built in
the test. Each stored pair is checked against the reference rule applied here (render with the
template, tokenize prompt + response as one text, split at the prompt's token boundary) and, on
the BPE tokenizer, against TRL's own CPOTrainer.tokenize_row.
"""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import jinja2
import pytest
import sentencepiece
import tokenizers
from test_preprocess import SP_MODEL, expected_pair, read_pairs, run, write_jsonl
from tokenizers import decoders, models, pre_tokenizers, trainers

from simpo_megatron.data.builder import read_sidecar
from simpo_megatron.data.pair_encoding import PairEncoder, Prepared, Tokenized, split_pair
from simpo_megatron.data.readers import Chunk
from simpo_megatron.data.tokenizers import (
    SentencePieceSpec,
    build_tokenizer,
    read_sentencepiece_spec,
    same_tokenizer,
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# template, special tokens, the end-of-turn token (None: EOS ends the turn)
FAMILIES = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, None),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}, None),
    "qwen2": (QWEN2, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, None),
    "gemma": (GEMMA, {"bos_token": "<s>", "eos_token": "</s>"}, "<end_of_turn>"),
}
BPE_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
]
SP_CONTROLS = re.compile("(<s>|</s>)")

USER1, ANSWER1 = "Sort ascending: 42 7 19", "7 19 42"
USER2 = "Now descending, please.\nThanks!"
CONVERSATIONS = [
    # single turn, the responses as strings
    {"prompt": [{"role": "user", "content": USER1}], "chosen": " 7 19 42", "rejected": "\n42 19 7"},
    # multi-turn (HH / UltraFeedback style): an earlier assistant turn inside the prompt, and the
    # responses as full conversations repeating the prompt turns
    {
        "prompt": [
            {"role": "user", "content": USER1},
            {"role": "assistant", "content": ANSWER1},
            {"role": "user", "content": USER2},
        ],
        "chosen": [
            {"role": "user", "content": USER1},
            {"role": "assistant", "content": ANSWER1},
            {"role": "user", "content": USER2},
            {"role": "assistant", "content": "42 19 7"},
        ],
        "rejected": [
            {"role": "user", "content": USER1},
            {"role": "assistant", "content": ANSWER1},
            {"role": "user", "content": USER2},
            {"role": "assistant", "content": "Sure: 7 19 42"},
        ],
    },
]
CORPUS = [
    USER1,
    ANSWER1,
    USER2,
    "42 19 7",
    "Sure: 7 19 42",
    "You are a helpful assistant.",
    "[INST] [/INST]",
    "user model system assistant",
] * 20


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer.json with every family's special tokens."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=BPE_SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A SentencePiece BPE model with <s>/</s> and Gemma's turn markers as user-defined pieces."""
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_writer=f,
            model_type="bpe",
            vocab_size=120,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"],
            num_threads=1,
            minloglevel=2,
        )
    return str(path)


def hf_dir(tmp_path: Path, bpe_file: str, family: str) -> str:
    template, specials, _ = FAMILIES[family]
    directory = tmp_path / family
    directory.mkdir()
    (directory / "tokenizer.json").write_text(Path(bpe_file).read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**specials, "chat_template": template}))
    return str(directory)


def render(template: str, messages, add_generation_prompt: bool, specials: dict) -> str:
    """The template rendered by jinja2 directly, as transformers sets it up."""

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception, **specials
    )


def reference_texts(conversation, family: str) -> dict:
    """Prompt and response texts by the reference rule: prompt = the conversation up to the generation
    prompt, a response = what the full conversation renders after it (whitespace after a closing EOS
    dropped)."""
    template, specials, _ = FAMILIES[family]
    prompt = conversation["prompt"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_text = render(template, turns, True, specials)
    texts = {"prompt": prompt_text}
    for key in ("chosen", "rejected"):
        value = conversation[key]
        reply = [{"role": "assistant", "content": value}] if isinstance(value, str) else value[len(turns) :]
        response = render(template, turns + reply, False, specials)[len(prompt_text) :]
        texts[key] = response.rstrip() if response.rstrip().endswith(specials["eos_token"]) else response
    return texts


def sp_encode(sp, text: str) -> list[int]:
    """SentencePiece ids with <s> and </s> in the text as the control tokens."""
    ids = []
    for part in SP_CONTROLS.split(text):
        ids.extend([sp.piece_to_id(part)] if part in ("<s>", "</s>") else sp.encode(part) if part else [])
    return ids


CASES = [(family, "bpe") for family in FAMILIES] + [("mistral", "sp"), ("gemma", "sp")]


@pytest.mark.parametrize("family, kind", CASES)
def test_chat_template_families(tmp_path, bpe_file, sp_model, family, kind):
    template, specials, end_of_turn = FAMILIES[family]
    path = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    if kind == "bpe":
        raw = tokenizers.Tokenizer.from_file(bpe_file)
        encode = lambda text: raw.encode(text, add_special_tokens=False).ids  # noqa: E731
        token_id = raw.token_to_id
        assert run(tmp_path, path, tokenizer=("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, family))) == 0
    else:
        sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
        encode, token_id = (lambda text: sp_encode(sp, text)), sp.piece_to_id
        template_file = tmp_path / "template.jinja"
        template_file.write_text(template)
        assert (
            run(tmp_path, path, "--chat-template", str(template_file), tokenizer=("SentencePieceTokenizer", sp_model))
            == 0
        )
    bos = token_id(specials["bos_token"]) if "bos_token" in specials else None
    eos = token_id(specials["eos_token"])
    stored = read_pairs(tmp_path / "o" / "out")
    for conversation, (prompt, chosen, rejected) in zip(CONVERSATIONS, stored, strict=True):
        texts = reference_texts(conversation, family)
        assert (prompt, chosen, rejected) == expected_pair(encode, texts, bos, eos)
        for response, text in ((chosen, texts["chosen"]), (rejected, texts["rejected"])):
            full = encode(texts["prompt"] + text)  # the tokenized full conversation
            joined = prompt + response
            joined = joined[1:] if full[:1] != joined[:1] else joined  # a BOS we placed
            assert (joined if full[-1] == eos else joined[:-1]) == full  # less an EOS we appended
            assert response[-1] == eos and response.count(eos) == 1  # one EOS, the template's or ours
            if end_of_turn:  # the template's end-of-turn marker stays, EOS follows it
                assert token_id(end_of_turn) in response[-3:]
        if bos is not None:
            assert prompt[0] == bos and prompt.count(bos) == 1  # the template's BOS, not a second
    if family == "qwen2":  # the default system prompt, no BOS
        system = encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert all(prompt[: len(system)] == system for prompt, _, _ in stored)


def test_matches_trl_tokenize_row(tmp_path, bpe_file):
    """Our stored sequences equal TRL's CPOTrainer.tokenize_row on the same tokenizer and texts."""
    # Imported here (TRL is slow to import), and not skipped: a moved module fails the test.
    import transformers
    from trl.experimental.cpo import cpo_trainer as cpo

    pairs = [
        {"prompt": "Sort ascending: 42 7 19\nAnswer:", "chosen": " 7 19 42", "rejected": " 42 19 7"},
        {"prompt": "Sort descending: ", "chosen": "42 19 7", "rejected": " 7 19 42"},  # " " + "42" merge
        {"prompt": "<s>user: hi\n", "chosen": "\n\nhello there", "rejected": "hi</s>"},
    ]
    family_dir = hf_dir(tmp_path, bpe_file, "mistral")
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", pairs), tokenizer=("HuggingFaceTokenizer", family_dir)) == 0
    fake = types.SimpleNamespace(
        processing_class=transformers.AutoTokenizer.from_pretrained(family_dir),
        is_encoder_decoder=False,
        max_length=10**6,
    )
    fake.build_tokenized_answer = types.MethodType(cpo.CPOTrainer.build_tokenized_answer, fake)
    prompt_lengths = []
    for pair, (prompt, chosen, rejected) in zip(pairs, read_pairs(tmp_path / "o" / "out"), strict=True):
        trl = cpo.CPOTrainer.tokenize_row(fake, dict(pair))
        assert prompt + chosen == trl["chosen_input_ids"] and prompt + rejected == trl["rejected_input_ids"]
        lengths = [trl[f"{key}_labels"].count(-100) for key in ("chosen", "rejected")]
        assert len(prompt) == min(lengths)  # TRL's prompt per response; ours the shorter (split_pair)
        prompt_lengths.append(lengths)
    assert prompt_lengths[1][0] + 1 == prompt_lengths[1][1]  # only the chosen response merged
    assert all(a == b for a, b in prompt_lengths[::2])


def test_same_tokenizer_is_one_definition(tmp_path, bpe_file, sp_model):
    """The sidecar's identity and training's check agree: a template or pad change is the same tokenizer."""
    a = build_tokenizer("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "mistral")).describe()
    b = build_tokenizer("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "gemma")).describe()
    assert a["chat_template_sha256"] != b["chat_template_sha256"] and same_tokenizer(a, b) is None
    c = build_tokenizer("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "llama3")).describe()
    assert same_tokenizer(a, c) == "bos_id"
    d = build_tokenizer("SentencePieceTokenizer", sp_model).describe()
    assert same_tokenizer(a, d) == "type"
    assert same_tokenizer(d, {**d, "fingerprint": "other"}) == "fingerprint"


def test_training_checks_the_sidecar_with_the_same_rule(tmp_path, bpe_file):
    """_check_sidecars accepts the tokenizer that wrote the data (another template is fine) and names
    the first field that differs otherwise; the fingerprint is stable across processes."""
    from simpo_megatron.data.provider import DataMismatchError, _check_sidecars

    pairs = [{"prompt": "Sort ascending: 42 7 19", "chosen": " 7 19 42", "rejected": " 42 19 7"}]
    mistral = hf_dir(tmp_path, bpe_file, "mistral")
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", pairs), tokenizer=("HuggingFaceTokenizer", mistral)) == 0
    prefix = str(tmp_path / "o" / "out")
    _check_sidecars([prefix], build_tokenizer("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "gemma")))
    with pytest.raises(DataMismatchError, match="bos_id"):
        _check_sidecars([prefix], build_tokenizer("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "llama3")))
    code = (
        "from simpo_megatron.data.tokenizers import build_tokenizer; "
        f"print(build_tokenizer('HuggingFaceTokenizer', {mistral!r}).fingerprint)"
    )
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == read_sidecar(prefix)["tokenizer"]["fingerprint"]


@pytest.mark.parametrize(
    "chosen_full, rejected_full, expected",
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 6], ([1, 2, 3, 4], [5], [6], 0, 0)),  # no merge
        ([1, 2, 3, 9, 5], [1, 2, 3, 8], ([1, 2, 3], [9, 5], [8], 2, 0)),  # both merged with the last token
        ([1, 2, 3, 9, 5], [1, 2, 3, 4, 6], ([1, 2, 3], [9, 5], [4, 6], 1, 1)),  # one merged: the other shifts
        ([1, 2, 7, 5], [1, 2, 3, 4, 6], ([1, 2], [7, 5], [3, 4, 6], 1, 2)),  # two prompt tokens merged
        ([1, 5], [1, 5, 6], ([1, 5], [], [6], 2, 2)),  # a full text shorter than the prompt: chosen empty
    ],
)
def test_split_pair(chosen_full, rejected_full, expected):
    """Prompt + response is always the full tokenization; the prompt ends at TRL's boundary or earlier."""
    assert split_pair([1, 2, 3, 4], chosen_full, rejected_full) == expected


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Prompt endings and response starts that merge across the boundary, or do not: a newline after
# a ChatML header, "▁8" + "8", a space before punctuation, repeated whitespace, special tokens.
PROMPT_PARTS = [
    "Sort",
    " ascending:",
    " 42 7 19",
    "\nAnswer:",
    " 8",
    " x",
    "\n",
    "\n\n",
    " ",
    "  ",
    "é",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
    "<s>",
    " [INST]",
    "sure,",
    "\t",
    " Ünï",
    " Su",
    " 4",
    " asc",
]
RESPONSE_PARTS = [
    "8",
    " 8",
    "\n",
    "\n\n42",
    " 7 19 42",
    "42",
    "!",
    " ",
    "  yes",
    "é",
    "<end_of_turn>",
    "</s>",
    "Sure: 7",
    "\tok",
    "19",
    "re: 7",
    "2 19",
    "ending",
]


# Responses that start with a word after a space, as plain-text pairs have them (" 42" after "Answer:").
WORD_STARTS = [" 8", " 7 19 42", " yes", " Sure: 7", " 42\n", " ending"]


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = __import__("random").Random(seed)
    part = lambda parts, lo, hi: "".join(rng.choice(parts) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [(part(PROMPT_PARTS, 1, 10), part(RESPONSE_PARTS, 1, 4), part(RESPONSE_PARTS, 1, 4)) for _ in range(n)]
    starts = [
        (
            part(PROMPT_PARTS, 1, 10),
            rng.choice(WORD_STARTS) + part(RESPONSE_PARTS, 0, 2),
            rng.choice(WORD_STARTS) + part(RESPONSE_PARTS, 0, 2),
        )
        for _ in range(n // 2)
    ]
    return [pair for pair in pairs + starts if pair[1] != pair[2]]


def sp_variant(tmp_path: Path, name: str, **options) -> str:
    path = tmp_path / f"{name}.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS + ["8 88 42 7 19 Ünï é"] * 5),
            model_writer=f,
            model_type="bpe",
            vocab_size=120,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            num_threads=1,
            minloglevel=2,
            **options,
        )
    return str(path)


def bpe_variant(tmp_path: Path, bpe_file: str, name: str, pre_tokenizer) -> str:
    tok = tokenizers.Tokenizer.from_file(bpe_file)
    tok.pre_tokenizer = pre_tokenizer
    directory = tmp_path / name
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(directory)


def bpe_trained(tmp_path: Path, name: str, pre_tokenizer) -> str:
    """A byte-level BPE trained with `pre_tokenizer`, so its merges follow that word split."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=BPE_SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS + ["8 88 42 7 19 yes ending Answer: 42"] * 5, trainer)
    directory = tmp_path / name
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(directory)


def test_last_words_path_gives_the_ids_of_the_whole_text_rule(tmp_path, bpe_file, sp_model):
    """Encoding each response from a word start (PairEncoder's paths: its own first word, or the
    prompt's last words) stores exactly what tokenizing prompt, prompt + chosen and prompt + rejected
    whole stores (TRL's rule, split_pair), boundary merges included, on byte-level BPE (GPT-2 and
    Llama-3 pre-tokenizers, and one that joins a space to the word before it), SentencePiece with
    and without whitespace cleanup, and tokenizers that do not split at spaces (encoded whole)."""
    from tokenizers import Regex

    kinds = {
        "bpe-gpt2": ("HuggingFaceTokenizer", hf_dir(tmp_path, bpe_file, "qwen2"), True),
        "bpe-llama3": (
            "HuggingFaceTokenizer",
            bpe_variant(
                tmp_path,
                bpe_file,
                "llama3-split",
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                ),
            ),
            True,
        ),
        "bpe-space-with-previous": (
            "HuggingFaceTokenizer",
            bpe_trained(
                tmp_path,
                "space-with-previous",
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(" ", behavior="merged_with_previous"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                ),
            ),
            True,
        ),
        "bpe-no-pre-tokenizer": (
            "HuggingFaceTokenizer",
            bpe_variant(tmp_path, bpe_file, "bare", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)),
            False,
        ),
        "sp": ("SentencePieceTokenizer", sp_model, True),
        "sp-keeps-whitespace": (
            "SentencePieceTokenizer",
            sp_variant(tmp_path, "llama2", remove_extra_whitespaces=False),
            True,
        ),
        "sp-no-word-split": (
            "SentencePieceTokenizer",
            sp_variant(tmp_path, "nosplit", split_by_whitespace=False),
            False,
        ),
    }
    pairs = random_pairs(1000)
    for name, (kind, model, splits) in kinds.items():
        tokenizer = build_tokenizer(kind, model)
        assert tokenizer.splits_at_spaces == splits, name
        encoder = PairEncoder(tokenizer, ("prompt", "chosen", "rejected"), append_eod=True)
        chunk = Chunk(list(range(len(pairs))), [None] * len(pairs))
        prepared = Prepared(chunk, chunk.locations, *map(list, zip(*pairs)), [])
        tokenized = encoder.tokenize(prepared)
        n = len(pairs)
        prompts = [p for p, _, _ in pairs]
        ids = tokenizer.tokenize_batch(prompts + [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs])
        whole = [Tokenized(ids[i], 0, ids[n + i], ids[2 * n + i]) for i in range(n)]
        new, old = encoder.finish(prepared, tokenized), encoder.finish(prepared, whole)
        assert new.tokens.tolist() == old.tokens.tolist() and new.offsets.tolist() == old.offsets.tolist(), name
        assert new.merges == old.merges and new.failures == old.failures, name
        assert old.merges["responses"] >= 10, name  # the cases exercise boundary merges
        heads = sum(t.head > 0 for t in tokenized)
        assert heads > len(pairs) // 2 if splits else heads == 0, name  # a word-start path ran
        starts = encoder.resume_at(*map(list, zip(*pairs)))
        at_response = sum(start >= len(prompt) for start, (prompt, _, _) in zip(starts, pairs))
        # The response's first word is a start unless the tokenizer joins a space to the word before.
        assert at_response > len(pairs) // 10 if splits and "with-previous" not in name else at_response == 0, name


def _spec_by_protobuf(serialized: bytes) -> SentencePieceSpec:
    """The reference: protobuf's own parser of sentencepiece_model.proto."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    whole = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED)
    return SentencePieceSpec(
        proto.trainer_spec.split_by_whitespace,
        proto.trainer_spec.treat_whitespace_as_suffix,
        tuple(p.piece for p in proto.pieces if p.type in whole),
    )


def test_sentencepiece_spec_reads_as_protobuf_does(tmp_path, sp_model):
    """The model's word-split flags and whole-matched pieces, read without protobuf, are protobuf's."""
    from sentencepiece import sentencepiece_model_pb2

    models = {
        "example": SP_MODEL,
        "sp": sp_model,
        "no-word-split": sp_variant(tmp_path, "nosplit", split_by_whitespace=False),
        "suffix": sp_variant(tmp_path, "suffix", treat_whitespace_as_suffix=True),
        "keeps-whitespace": sp_variant(tmp_path, "ws", remove_extra_whitespaces=False),
        "controls": sp_variant(tmp_path, "controls", control_symbols=["<ctl>", "<|im_end|>"]),
    }
    seen = set()
    for name, path in models.items():
        serialized = sentencepiece.SentencePieceProcessor(model_file=path).serialized_model_proto()
        spec = read_sentencepiece_spec(serialized)
        assert spec == _spec_by_protobuf(serialized), name
        tokenizer = build_tokenizer("SentencePieceTokenizer", path)
        assert tokenizer.added_texts == spec.added_pieces, name
        assert tokenizer.splits_at_spaces == (spec.split_by_whitespace and not spec.treat_whitespace_as_suffix)
        seen.add((spec.split_by_whitespace, spec.treat_whitespace_as_suffix))
    assert seen == {(True, False), (False, False), (True, True)}  # every flag value met
    assert (
        "<ctl>"
        in read_sentencepiece_spec(
            sentencepiece.SentencePieceProcessor(model_file=models["controls"]).serialized_model_proto()
        ).added_pieces
    )

    # Layouts a trainer does not write but the format allows: a long piece (two-byte length), a type
    # without a score, an unknown field, the type before the text, a trainer spec given twice (merged).
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece.SentencePieceProcessor(model_file=sp_model).serialized_model_proto())
    proto.pieces.add(piece="<" + "x" * 200 + ">", type=proto.SentencePiece.USER_DEFINED, score=0.5)
    proto.pieces.add(piece="<no-score>", type=proto.SentencePiece.CONTROL)
    proto.pieces.add(piece="plain")
    serialized = proto.SerializeToString()
    odd_piece = b"\x18\x04" + b"\x0a\x05<odd>" + b"\x20\x07"  # type, text, an unknown varint field 4
    serialized += b"\x0a" + bytes([len(odd_piece)]) + odd_piece
    spec = sentencepiece_model_pb2.TrainerSpec(split_by_whitespace=False).SerializeToString()
    serialized += b"\x12" + bytes([len(spec)]) + spec
    assert read_sentencepiece_spec(serialized) == _spec_by_protobuf(serialized)
    assert read_sentencepiece_spec(serialized).added_pieces[-3:] == ("<" + "x" * 200 + ">", "<no-score>", "<odd>")
    assert not read_sentencepiece_spec(serialized).split_by_whitespace
