"""A deterministic generated corpus: sequences from a fixed random Markov chain.

It has structure to learn (the loss falls) and needs no download. The same seed gives
the same tokens on every rank and in every run.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["MarkovTokens"]


class MarkovTokens(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``samples`` pairs (input, next-token target) of length ``block``.

    Args:
        samples: Number of sequences.
        block: Sequence length.
        vocab: Vocabulary size.
        seed: Corpus seed.
    """

    def __init__(self, samples: int = 4096, block: int = 64, vocab: int = 256, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        # Each token has 4 likely successors: a learnable, non-trivial chain.
        succ = torch.randint(0, vocab, (vocab, 4), generator=g)
        tokens = torch.empty(samples, block + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (samples,), generator=g)
        choice = torch.randint(0, 4, (samples, block), generator=g)
        noise = torch.rand(samples, block, generator=g) < 0.05
        rand_tok = torch.randint(0, vocab, (samples, block), generator=g)
        for i in range(block):
            nxt = succ[tokens[:, i], choice[:, i]]
            tokens[:, i + 1] = torch.where(noise[:, i], rand_tok[:, i], nxt)
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.tokens[i]
        return row[:-1], row[1:]
