"""Frozen text encoder over any transformers model that yields hidden states (hdm_spec 6).

Default: Qwen/Qwen3-0.6B, whose `last_hidden_state` is the final RMS-normalised hidden state. Training
pads every caption to `max_length` on the right; inference pads to the longest prompt. The attention
mask goes to the encoder only: the denoiser attends every returned token, padding included.

`cache_size` keeps the states of the last N distinct captions (training only: padded to `max_length`, a
caption's states do not depend on the rest of its batch). It pays off where captions repeat (the demo's 48
captions, the empty caption of caption dropout); with mostly unique captions leave it at 0.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-0.6B"


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Half precision on GPU, float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 256, cache_size: int = 0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # prompt -> (max_length, hidden), LRU order
        if tokenizer.pad_token is None:
            # Qwen3 pads with <|endoftext|>; a tokenizer without a pad token pads with its EOS token.
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_TEXT_ENCODER, *, max_length: int = 256,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        cache_size: int = 0, **kwargs) -> TextEncoder:
        """Load a hub id or a local directory through the transformers Auto classes (no LM head)."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        model = AutoModel.from_pretrained(model_id, dtype=dtype or default_dtype(device), **kwargs)
        return cls(model.to(device), tokenizer, max_length=max_length, cache_size=cache_size)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:  # always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], *, padding: Literal["max_length", "longest"] = "max_length") -> Tensor:
        """Hidden states (B, T, hidden): T = max_length for training, the longest prompt for inference.

        Newlines become spaces. An empty prompt never yields zero tokens: at least one pad token is kept
        and attended to, since a model sees no key at all otherwise.
        """
        prompts = [p.replace("\n", " ") for p in prompts]
        if padding == "max_length" and self.cache_size > 0:
            return self._cached(prompts)
        return self._encode(prompts, padding)

    def _cached(self, prompts: list[str]) -> Tensor:
        misses = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if misses:
            for prompt, states in zip(misses, self._encode(misses, "max_length")):
                self._cache[prompt] = states
        out = torch.stack([self._cache[p] for p in prompts])
        for prompt in dict.fromkeys(prompts):
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _encode(self, prompts: list[str], padding: str) -> Tensor:
        batch = self.tokenizer(prompts, padding=padding, truncation=padding == "max_length",
                               max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.shape[1] == 0:  # every prompt empty and padding to the longest: one pad token each
            ids = torch.full((len(prompts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        empty = mask.sum(dim=1) == 0
        mask[empty, 0] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state
