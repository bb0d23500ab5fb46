"""From CTC log-probs to text. Every decoder has one signature:

    decoder(log_probs (B, T, V), lengths (B,)) -> list of B strings

so callers swap greedy for beam search without knowing which they hold.
"""

from __future__ import annotations

from typing import Protocol

import torch

from asr.text import CharTokenizer


class Decoder(Protocol):
    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]: ...


class GreedyDecoder:
    """Best token per frame, repeats merged, blanks removed."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        best = log_probs.argmax(dim=-1).cpu()  # (B, T)
        texts = []
        for ids, n in zip(best, lengths.tolist()):
            ids = torch.unique_consecutive(ids[:n])
            texts.append(" ".join(self.tokenizer.decode(ids.tolist()).split()))
        return texts


def build_decoder(name: str, tokenizer: CharTokenizer, **options) -> Decoder:
    """The decoder called `name` ('greedy'; 'beam' arrives with the n-gram LM work)."""
    if name == "greedy":
        return GreedyDecoder(tokenizer)
    raise ValueError(f"unknown decoder {name!r}: choose 'greedy'")
