"""Generate the example preference dataset and its SentencePiece tokenizer (examples/data/).

The tasks are ones a tiny model learns in about a hundred SimPO steps, each with a rejected
response that is wrong in one systematic way and has the same tokens as the chosen one, so
that only the order or choice of tokens separates them (no length or vocabulary shortcut):

- reverse a list of words: chosen reversed, rejected left in the original order;
- sort numbers ascending: chosen ascending, rejected descending;
- pick the largest number: chosen the largest, rejected the smallest.

Output: train.jsonl, valid.jsonl ({"prompt", "chosen", "rejected"} strings; no valid prompt
appears in train) and tokenizer.model (BPE, bos 1, eos 2, pad 3, unk 0), trained on the train
split. Deterministic for a given --seed; the defaults reproduce the committed files:

    python tools/make_example_data.py --output-dir examples/data
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from collections.abc import Iterator, Sequence

import sentencepiece

WORDS = (
    "apple river stone cloud tiger maple candle rocket garden silver pencil window forest "
    "ladder orange castle bridge violin meadow planet copper falcon harbor jungle lemon "
    "marble needle ocean pepper quartz saddle tunnel velvet walnut yellow zebra anchor "
    "basket cactus dragon engine feather glacier hammer island jacket kettle lantern mirror "
    "nickel oyster puzzle rabbit spider tomato umbrella valley wizard beacon cherry"
).split()

REVERSE = ("Reverse the words: {}", "Write these words in reverse order: {}", "Reverse: {}")
SORT = ("Sort these numbers from smallest to largest: {}", "Sort ascending: {}", "Put in increasing order: {}")
LARGEST = ("Which number is the largest: {}", "Largest of: {}", "Name the biggest number: {}")


def make_pair(rng: random.Random) -> dict[str, str]:
    """One pair from a random task."""
    task = rng.randrange(3)
    if task == 0:
        words = rng.sample(WORDS, rng.randint(3, 6))
        prompt, chosen, rejected = rng.choice(REVERSE), words[::-1], words
    else:
        numbers = rng.sample(range(100), rng.randint(3, 6))
        if task == 1:
            prompt, chosen, rejected = rng.choice(SORT), sorted(numbers), sorted(numbers, reverse=True)
        else:
            prompt, chosen, rejected = rng.choice(LARGEST), [max(numbers)], [min(numbers)]
        words = [str(n) for n in numbers]
    return {
        "prompt": prompt.format(" ".join(words)) + "\nAnswer:",
        # A leading space, as the answer follows "Answer:" in the tokenized conversation.
        "chosen": " " + " ".join(map(str, chosen)),
        "rejected": " " + " ".join(map(str, rejected)),
    }


def make_splits(num_train: int, num_valid: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and valid pairs with distinct prompts, no valid prompt in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[dict[str, str]] = []
    while len(pairs) < num_train + num_valid:
        pair = make_pair(rng)
        if pair["prompt"] not in seen:
            seen.add(pair["prompt"])
            pairs.append(pair)
    return pairs[:num_train], pairs[num_train:]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> bytes:
    """A small BPE SentencePiece model (serialized) with BOS/EOS/PAD, as Llama-style models use."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        normalization_rule_name="identity",  # keeps the model file small (no NFKC table)
        user_defined_symbols=["\n"],  # a piece of its own, so "74\n" does not merge into one token
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_jsonl(path: str, pairs: Sequence[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="examples/data")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-valid", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    train, valid = make_splits(args.num_train, args.num_valid, args.seed)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "valid.jsonl"), valid)
    texts = (text for pair in train for text in (pair["prompt"], pair["chosen"]))
    with open(os.path.join(args.output_dir, "tokenizer.model"), "wb") as f:
        f.write(train_tokenizer(texts, args.vocab_size))
    print(f"wrote {len(train)} train and {len(valid)} valid pairs and tokenizer.model to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
