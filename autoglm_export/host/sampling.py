"""Next-token choice from logits: greedy, or sampling with OpenAI's and Hugging Face's knobs.

The order is Hugging Face's (repetition penalties, temperature, top-k, top-p), with OpenAI's
additive penalties: ``frequency_penalty`` subtracts ``count * f`` from a token's logit and
``presence_penalty`` subtracts ``p`` once a token has appeared, both over the tokens generated in
this answer. Temperature 0 means greedy (after the penalties), as OpenAI-compatible servers do.
A seed makes a request reproducible; without one each request draws its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """``choose(logits, tokens so far)`` for ``host.generate.generate``."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, tokens: list[int]) -> int:
        p = self.params
        x = logits.float().reshape(-1).clone()
        if tokens and (p.frequency_penalty or p.presence_penalty):
            counts = Counter(tokens)
            ids = torch.tensor(list(counts), dtype=torch.long)
            n = torch.tensor(list(counts.values()), dtype=torch.float32)
            x[ids] -= n * p.frequency_penalty + p.presence_penalty
        if p.greedy:
            return int(x.argmax())
        x = x / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            order = torch.argsort(x, descending=True)
            probs = torch.softmax(x[order], dim=0)
            # keep the smallest head whose mass reaches top_p (the first token always stays)
            drop = torch.cumsum(probs, dim=0) - probs >= p.top_p
            x[order[drop]] = float("-inf")
        probs = torch.softmax(x, dim=0)
        return int(torch.multinomial(probs, 1, generator=self.generator))
