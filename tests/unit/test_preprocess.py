"""The data tool (simpo_megatron.data.preprocess, tools/preprocess_preference_data.py): tokenization,
chat templates, bad input, workers, interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import tokenizers
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import decoders, models, pre_tokenizers, trainers

from simpo_megatron.data import preprocess
from simpo_megatron.data.builder import PreferencePairWriter, read_sidecar
from simpo_megatron.data.readers import CHUNK_PAIRS
from simpo_megatron.data.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[2]

SP_MODEL = str(REPO / "examples" / "data" / "tokenizer.model")
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PAIRS = [
    {
        "prompt": "Reverse the words: apple river stone\nAnswer:",
        "chosen": " stone river apple",
        "rejected": " apple river stone",
    },
    {"prompt": "Sort ascending: 42 7 19\nAnswer:", "chosen": " 7 19 42", "rejected": " 42 19 7"},
    # "▁8" + "8" merge into "▁88" when tokenized together; " 3" does not merge.
    {"prompt": "Largest of: 3 88 12\nAnswer: 8", "chosen": "8", "rejected": " 3"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer with a Zephyr-style chat template, made here."""
    path = tmp_path_factory.mktemp("hf")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text for pair in PAIRS for text in pair.values()] * 10, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": ZEPHYR_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def split_at_prompt(encode, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The reference rule (TRL's build_tokenized_answer): tokenize prompt + response as one text,
    split where the tokenized prompt ends, one token earlier when the last prompt token merged."""
    prompt_ids, full = encode(prompt), encode(prompt + response)
    start = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
    return full[:start], full[start:]


def expected_pair(encode, pair, bos: int | None, eos: int | None) -> tuple[list[int], list[int], list[int]]:
    """The stored pair by the reference rule: prompts split per response, then one shared prompt up
    to the earlier split (the other response starts with the prompt's last token); BOS and EOS
    added where missing."""
    prompt_c, chosen = split_at_prompt(encode, pair["prompt"], pair["chosen"])
    prompt_r, rejected = split_at_prompt(encode, pair["prompt"], pair["rejected"])
    shared = min(len(prompt_c), len(prompt_r))
    assert prompt_c[:shared] == prompt_r[:shared]
    chosen, rejected = prompt_c[shared:] + chosen, prompt_r[shared:] + rejected
    prompt = prompt_c[:shared] if bos is None or prompt_c[:1] == [bos] else [bos] + prompt_c[:shared]
    eos = [] if eos is None else [eos]
    return prompt, chosen + ([] if chosen[-1:] == eos else eos), rejected + ([] if rejected[-1:] == eos else eos)


def write_jsonl(path: Path, records) -> str:
    with open(path, "wb") as f:
        for record in records:
            f.write(record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n")
    return str(path)


def run(
    tmp_path: Path, input_path: str, *extra: str, tokenizer=("SentencePieceTokenizer", SP_MODEL), prefix: str = "out"
) -> int:
    argv = [
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "o" / prefix),
        "--tokenizer-type",
        tokenizer[0],
        "--tokenizer-model",
        tokenizer[1],
        *extra,
    ]
    return preprocess.main(argv)


def read_pairs(prefix: Path) -> list[tuple[list[int], list[int], list[int]]]:
    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(0, len(ds) + 1, 3))
    return [tuple(ds[i + j].tolist() for j in range(3)) for i in range(0, len(ds), 3)]


def outputs(tmp_path: Path) -> list[str]:
    out = tmp_path / "o"
    return sorted(os.listdir(out)) if out.exists() else []


def test_tool_imports_only_what_it_uses():
    """No megatron-core, torch, transformers or protobuf (which the package does not require) for a
    SentencePiece run: --help is quick and silent."""
    code = (
        "import sys; import simpo_megatron.data.preprocess as p; "
        "p.PairEncoder(p.build_tokenizer('SentencePieceTokenizer', 'examples/data/tokenizer.model'), "
        "('prompt', 'chosen', 'rejected'), True); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'torch', 'transformers', 'google'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""
    helped = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_preference_data.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--tokenizer-model" in helped.stdout and helped.stderr == ""


def test_sentencepiece_ids_equal_sentencepiece(tmp_path, capsys):
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", PAIRS)) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=SP_MODEL)
    expected = [expected_pair(sp.encode, p, sp.bos_id(), sp.eos_id()) for p in PAIRS]
    assert read_pairs(tmp_path / "o" / "out") == expected
    assert expected[0][1] == sp.encode(PAIRS[0]["chosen"]) + [sp.eos_id()]  # no merge: as tokenized alone
    assert [sp.id_to_piece(i) for i in expected[2][1]] == ["▁88", "</s>"]  # the merged token
    assert [sp.id_to_piece(i) for i in expected[2][2]] == ["▁8", "▁3", "</s>"]  # starts with the prompt's last
    meta = read_sidecar(str(tmp_path / "o" / "out"))
    assert meta["num_pairs"] == 3 and meta["dtype"] == "uint16" and meta["skipped"] == {}
    assert meta["tokenizer"] == build_tokenizer("SentencePieceTokenizer", SP_MODEL).describe()
    assert meta["boundary_merges"] == {"responses": 1, "shifted": 1}
    summary = capsys.readouterr().out
    assert "wrote 3 pairs" in summary and "p99" in summary and "rejected" in summary
    assert "boundary merges: 1 of 6 responses" in summary


def test_huggingface_ids_equal_tokenizers(tmp_path, hf_dir):
    pairs = [{"prompt": "say <s> hi", "chosen": "yes", "rejected": "no"}]
    assert (
        run(
            tmp_path,
            write_jsonl(tmp_path / "in.jsonl", PAIRS + pairs),
            "--no-append-eod",
            tokenizer=("HuggingFaceTokenizer", hf_dir),
        )
        == 0
    )
    tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    expected = [expected_pair(ids, p, 1, None) for p in PAIRS + pairs]
    assert read_pairs(tmp_path / "o" / "out") == expected
    assert expected[-1][0].count(1) == 2  # "<s>" inside the text is the BOS token, as in HF


def test_chat_template_matches_transformers(hf_dir):
    import transformers

    reference = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ours = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
    ]
    for turns, gen in ((messages[:2], True), (messages, False)):
        assert ours.apply_chat_template(turns, gen) == reference.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=gen
        )
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )


def test_chat_messages_render_with_template(tmp_path, hf_dir):
    prompt = "Reverse: a b c"
    conversations = [
        # UltraFeedback shape: chosen/rejected repeat the prompt turn.
        {
            "prompt": prompt,
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "c b a"}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "a b c"}],
        },
        # The same pair with assistant turns only, and with the prompt as messages.
        {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": "c b a"}],
            "rejected": "a b c",
        },
    ]
    assert (
        run(tmp_path, write_jsonl(tmp_path / "in.jsonl", conversations), tokenizer=("HuggingFaceTokenizer", hf_dir))
        == 0
    )
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    first, second = read_pairs(tmp_path / "o" / "out")
    assert first == second
    prompt_ids, chosen_ids, rejected_ids = first
    prompt_text = f"<s><|user|>\n{prompt}</s>\n<|assistant|>\n"
    assert prompt_ids == tok.tokenize(prompt_text)
    assert prompt_ids.count(tok.bos_id) == 1 and prompt_ids[0] == tok.bos_id  # the template's BOS, once
    assert prompt_ids + chosen_ids == tok.tokenize(prompt_text + "c b a</s>")  # the template's EOS, not two
    assert prompt_ids + rejected_ids == tok.tokenize(prompt_text + "a b c</s>")
    assert rejected_ids.count(tok.eos_id) == 1


def test_chat_template_file_with_sentencepiece(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    pair = {"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2"}], "chosen": "1 2 3", "rejected": "3 2 1"}
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", [pair]), "--chat-template", str(template)) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=SP_MODEL)
    [(prompt_ids, chosen_ids, _)] = read_pairs(tmp_path / "o" / "out")
    prompt_text = "user: Sort ascending: 3 1 2\nassistant:"
    assert prompt_ids == [sp.bos_id()] + sp.encode(prompt_text)
    assert prompt_ids + chosen_ids == [sp.bos_id()] + sp.encode(prompt_text + " 1 2 3\n") + [sp.eos_id()]
    meta = read_sidecar(str(tmp_path / "o" / "out"))
    assert meta["tokenizer"]["chat_template_sha256"] is not None


def test_chat_messages_without_template_fail_even_when_skipping(tmp_path, capsys):
    pair = {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", [pair]), "--skip-invalid") == 1
    assert "no chat template" in capsys.readouterr().err
    assert outputs(tmp_path) == []


GOOD = {"prompt": "Largest of: 1 2\nAnswer:", "chosen": "2", "rejected": "1"}
BAD = {
    "malformed_json": (b'{"prompt": "x", "chosen": \n', "malformed JSON"),
    # a chunk's lines parse as one JSON array when each holds one value: this one holds two
    "two_values": (b'{"prompt": "x", "chosen": "a", "rejected": "b"}, 7\n', "malformed JSON: Extra data"),
    "invalid_utf8": (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n', "invalid UTF-8"),
    "lone_surrogate": (b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n', "lone surrogate"),
    "missing_field": ({"prompt": "x", "chosen": "a"}, "field 'rejected' is missing"),
    "bad_type": ({"prompt": "x", "chosen": 5, "rejected": "b"}, "field 'chosen' must be a string"),
    "not_an_object": (b'["x", "a", "b"]\n', "expected a JSON object, got an array"),
    "empty_prompt": ({"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    "empty_response": ({"prompt": "x", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    "identical_responses": ({"prompt": "x", "chosen": "a", "rejected": "a"}, "are identical"),
}
REASON = {"lone_surrogate": "invalid_utf8", "not_an_object": "bad_type", "two_values": "malformed_json"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(tmp_path, capsys, case):
    record, message = BAD[case]
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, record, GOOD])
    assert run(tmp_path, path) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: " in err and message in err and "nothing written" in err
    assert outputs(tmp_path) == []

    assert run(tmp_path, path, "--skip-invalid") == 0
    assert len(read_pairs(tmp_path / "o" / "out")) == 2
    reason = REASON.get(case, case)
    assert read_sidecar(str(tmp_path / "o" / "out"))["skipped"] == {reason: 1}
    assert f"skipped 1 pairs: {reason} 1" in capsys.readouterr().out


def test_blank_lines_are_skipped_and_counted_in_line_numbers(tmp_path, capsys):
    lines = [b"\xef\xbb\xbf\n", GOOD, b"\n", b" \t\r\n", GOOD, BAD["malformed_json"][0], GOOD]  # a BOM, then blank
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert run(tmp_path, path) == 1
    assert f"{path}:6: malformed JSON" in capsys.readouterr().err
    assert run(tmp_path, path, "--skip-invalid") == 0
    assert len(read_pairs(tmp_path / "o" / "out")) == 3


def test_file_level_errors(tmp_path, capsys):
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a model")
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    assert run(tmp_path, path, tokenizer=("SentencePieceTokenizer", str(bad_model))) == 1
    assert "cannot load the tokenizer" in capsys.readouterr().err
    assert run(tmp_path, path, tokenizer=("HuggingFaceTokenizer", str(tmp_path))) == 1
    assert "no Hugging Face tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    assert run(tmp_path, path, "--chat-template", str(tmp_path / "bad.jinja")) == 1
    assert "chat template does not parse" in capsys.readouterr().err
    (tmp_path / "arr.json").write_text('[{"prompt": "x",\n "chosen": }]')
    assert run(tmp_path, str(tmp_path / "arr.json")) == 1
    assert f"{tmp_path / 'arr.json'}:2: malformed JSON" in capsys.readouterr().err
    assert run(tmp_path, str(tmp_path / "missing.jsonl")) == 1
    assert "no such file" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty.jsonl", [b"\n"])
    assert run(tmp_path, empty) == 1
    assert "no valid pairs" in capsys.readouterr().err
    assert outputs(tmp_path) == []


def test_json_array_parquet_and_renamed_keys_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    renamed = [
        {"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"], "id": i} for i, p in enumerate(PAIRS)
    ]
    keys = ("--json-keys", "question", "good", "bad")
    assert run(tmp_path, write_jsonl(tmp_path / "in.jsonl", PAIRS), prefix="jsonl") == 0
    (tmp_path / "in.json").write_text(json.dumps(renamed, indent=1))
    assert run(tmp_path, str(tmp_path / "in.json"), *keys, prefix="json") == 0
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "in.parquet")
    assert run(tmp_path, str(tmp_path / "in.parquet"), *keys, prefix="parquet") == 0
    for prefix in ("json", "parquet"):
        for ext in ("bin", "idx"):
            assert (tmp_path / "o" / f"{prefix}.{ext}").read_bytes() == (tmp_path / "o" / f"jsonl.{ext}").read_bytes()


def test_two_workers_preserve_order(tmp_path):
    records = [
        {"prompt": f"Sort ascending: {i} {i + 7}\nAnswer:", "chosen": f" {i} {i + 7}", "rejected": f" {i + 7} {i}"}
        for i in range(5 * CHUNK_PAIRS + 17)
    ]
    records[1500] = b"{broken\n"
    path = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(tmp_path, path, "--skip-invalid", prefix="one") == 0
    assert run(tmp_path, path, "--skip-invalid", "--workers", "2", prefix="two") == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / "o" / f"two.{ext}").read_bytes() == (tmp_path / "o" / f"one.{ext}").read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=SP_MODEL)
    pairs = read_pairs(tmp_path / "o" / "two")
    assert len(pairs) == len(records) - 1
    assert sp.decode(pairs[1500][0]) == records[1501]["prompt"]
    assert [sp.decode(p[1]) for p in pairs[:3]] == ["0 7", "1 8", "2 9"]
    assert read_sidecar(str(tmp_path / "o" / "two"))["skipped"] == {"malformed_json": 1}

    assert run(tmp_path, path, "--workers", "2", prefix="fail") == 1
    assert not [p for p in outputs(tmp_path) if p.startswith("fail")]


def test_a_failing_run_stops_its_workers_only_once_their_chunks_are_back(tmp_path, monkeypatch):
    """Bad input met with chunks still in the workers: the pool is terminated only after they
    come back. Terminated earlier, its task thread can be left writing a chunk into the
    workers' pipe that no one reads any more, and the run hangs in the pool's exit."""
    from multiprocessing.pool import Pool

    outstanding = []
    terminate = Pool.terminate

    def recorded_terminate(self):
        outstanding.append(len(self._cache))  # results the pool still owes
        terminate(self)

    monkeypatch.setattr(Pool, "terminate", recorded_terminate)
    records = [PAIRS[i % len(PAIRS)] for i in range(8 * CHUNK_PAIRS)]
    records[CHUNK_PAIRS + 3] = b"{broken\n"
    path = write_jsonl(tmp_path / "in.jsonl", records)
    assert run(tmp_path, path, "--workers", "2", prefix="fail") == 1
    assert outstanding == [0]
    assert not [p for p in outputs(tmp_path) if p.startswith("fail")]


def test_killed_run_leaves_no_output(tmp_path):
    line = json.dumps(PAIRS[0]).encode() + b"\n"
    (tmp_path / "big.jsonl").write_bytes(line * 300_000)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_preference_data.py"),
            "--input",
            str(tmp_path / "big.jsonl"),
            "--output-prefix",
            str(tmp_path / "o" / "out"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            SP_MODEL,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    # Wait until the run is under way: its temporary .bin holds data.
    while not any(".bin.tmp-" in p and (tmp_path / "o" / p).stat().st_size for p in outputs(tmp_path)):
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    # SIGKILL leaves no chance to clean up: only temporaries remain ...
    left = outputs(tmp_path)
    assert left and all(".tmp-" in p for p in left)
    # ... and the next run for that prefix removes them.
    assert run(tmp_path, write_jsonl(tmp_path / "small.jsonl", PAIRS)) == 0
    assert outputs(tmp_path) == ["out.bin", "out.idx", "out.meta.json"]


def test_interrupted_run_removes_its_files(tmp_path, monkeypatch, capsys):
    calls = []

    def add_batch(self, tokens, offsets):
        calls.append(len(offsets))
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, via SystemExit) does mid-run
        self._builder.add_batch(tokens, offsets)

    monkeypatch.setattr(PreferencePairWriter, "add_batch", add_batch)
    path = write_jsonl(tmp_path / "in.jsonl", PAIRS * CHUNK_PAIRS)
    assert run(tmp_path, path) == 130
    assert "interrupted; nothing written" in capsys.readouterr().err
    assert len(calls) == 2 and outputs(tmp_path) == []


def test_example_data_preprocesses(tmp_path):
    data = REPO / "examples" / "data"
    for split, count in (("train", 4000), ("valid", 200)):
        assert run(tmp_path, str(data / f"{split}.jsonl"), prefix=split) == 0
        pairs = read_pairs(tmp_path / "o" / split)
        assert len(pairs) == count
        first = json.loads((data / f"{split}.jsonl").read_text().splitlines()[0])
        sp = sentencepiece.SentencePieceProcessor(model_file=SP_MODEL)
        prompt, chosen, rejected = pairs[0]
        assert [sp.decode(prompt + ids) for ids in (chosen, rejected)] == [
            first["prompt"] + first["chosen"],
            first["prompt"] + first["rejected"],
        ]
        assert all(p[0][0] == sp.bos_id() and p[1][-1] == p[2][-1] == sp.eos_id() for p in pairs)
    assert np.all(IndexedDataset(str(tmp_path / "o" / "train")).sequence_lengths > 0)
