"""Synthetic preference pairs with a preference a small model can learn (``--mock-data``).

Prompts are random tokens. The chosen response draws its tokens from the even ids, the
rejected one from the odd ids (ids 0-2 are kept for pad/BOS/EOS). A model that learns the
preference raises the average log-prob of even tokens after a prompt above that of odd
ones, which takes reward accuracy from chance (0.5) to 1.0 on held-out pairs.
"""

from __future__ import annotations

import numpy as np
import torch

BOS, EOS, PAD = 1, 2, 0
FIRST_ID = 3


class MockPairDataset(torch.utils.data.Dataset):
    """``num_pairs`` deterministic pairs; item i is {"prompt", "chosen", "rejected"} arrays.

    Prompts start with BOS, responses end with EOS, as the preprocessing tool writes them;
    every sequence fits ``seq_length``.
    """

    pad_id = PAD

    def __init__(self, num_pairs: int, vocab_size: int, seq_length: int, seed: int = 0):
        if vocab_size < FIRST_ID + 2:
            raise ValueError(f"vocab_size must be >= {FIRST_ID + 2} for mock data, got {vocab_size}")
        if seq_length < 6:
            raise ValueError(f"seq_length must be >= 6 for mock data, got {seq_length}")
        self.num_pairs, self.vocab_size, self.seq_length, self.seed = num_pairs, vocab_size, seq_length, seed

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_pairs:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        prompt_len = int(rng.integers(2, self.seq_length // 2))
        room = self.seq_length - prompt_len - 1
        chosen_len, rejected_len = (int(rng.integers(1, room + 1)) for _ in range(2))
        evens = np.arange(FIRST_ID + FIRST_ID % 2, self.vocab_size, 2)
        odds = np.arange(FIRST_ID + 1 - FIRST_ID % 2, self.vocab_size, 2)
        prompt = np.concatenate([[BOS], rng.integers(FIRST_ID, self.vocab_size, prompt_len - 1)])
        chosen = np.concatenate([rng.choice(evens, chosen_len), [EOS]])
        rejected = np.concatenate([rng.choice(odds, rejected_len), [EOS]])
        return {
            "prompt": prompt.astype(np.int64),
            "chosen": chosen.astype(np.int64),
            "rejected": rejected.astype(np.int64),
        }
