"""Frozen text encoder over any transformers model that yields hidden states (hdm_spec 6).

Default: Qwen/Qwen3-0.6B, whose `last_hidden_state` is the final RMS-normalised hidden state. Training
pads every caption to `max_length` on the right; inference pads to the longest prompt. The attention
mask goes to the encoder only: the denoiser attends every returned token, padding included, so the pad
positions' states are part of the result and every kernel must keep the masked computation's values.

Two steps, so that the training prefetch thread can tokenise ahead: `tokenize` (CPU, thread-safe) makes
`Tokens`, `encode_tokens` runs the model. `forward` does both.

With "max_length" padding the empty prompt (caption dropout) is encoded once per dtype, device and length
and reused: its states do not depend on the rest of the batch. `cache_size` keeps the states of the last N
distinct other captions too (training only). It pays off where captions repeat (the demo's 48 captions);
with mostly unique captions leave it at 0.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-0.6B"
Padding = Literal["max_length", "longest"]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Half precision on GPU, float32 elsewhere (sampling; training on GPU loads bf16)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True, eq=False)
class Tokens:
    """Tokenised prompts (CPU): ids and padding mask (B, T) int64, right padding."""

    prompts: tuple[str, ...]  # as tokenised: newlines replaced
    ids: Tensor
    mask: Tensor
    padding: str  # "max_length" | "longest"

    def pin_memory(self) -> Tokens:
        """Pinned copies, so that `encode_tokens`' non_blocking copies overlap the GPU's work; without CUDA,
        self (pinning needs a CUDA driver)."""
        if not torch.cuda.is_available():
            return self
        return replace(self, ids=self.ids.pin_memory(), mask=self.mask.pin_memory())


def model_attention_mask(model: nn.Module, mask: Tensor) -> Tensor:
    """The attention mask handed to `model` for a (B, T) right-padding mask on its device.

    Qwen3 (full attention) on SDPA gets the causal and key-padding mask (B, 1, T, T) that transformers would
    build, made here: transformers first checks on the host whether the batch has padding at all, a GPU sync
    on every call. Other models and kernels get the padding mask as it is.
    """
    config = model.config
    if (config.model_type != "qwen3" or getattr(config, "_attn_implementation", None) != "sdpa"
            or set(getattr(config, "layer_types", None) or ()) - {"full_attention"}):
        return mask
    n = mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()  # query i sees keys <= i
    return causal & mask.bool()[:, None, None, :]  # (B, 1, T, T): ... and no pad key


def encode_ids(model: nn.Module, ids: Tensor, mask: Tensor | None) -> Tensor:
    """`model`'s last hidden state (B, T, hidden) for token ids and padding mask on its device (mask None:
    unmasked, for kernel comparisons only). No KV cache: it would keep a copy of every layer's keys."""
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    attention_mask = None if mask is None else model_attention_mask(model, mask)
    return model(input_ids=ids, attention_mask=attention_mask, **kwargs).last_hidden_state


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 256, cache_size: int = 0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # prompt -> (max_length, hidden), LRU order
        self._empty: dict[tuple, Tensor] = {}  # (device, dtype, length) -> the empty prompt's (length, hidden)
        # HF fast tokenizers raise "Already borrowed" when two threads call them at once.
        self._lock = threading.Lock()
        if tokenizer.pad_token is None:
            # Qwen3 pads with <|endoftext|>; a tokenizer without a pad token pads with its EOS token.
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

    def __getstate__(self) -> dict:  # a lock cannot be pickled or deep-copied: a copy gets its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_TEXT_ENCODER, *, max_length: int = 256,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None, cache_size: int = 0, **kwargs) -> TextEncoder:
        """Load a hub id or a local directory through the transformers Auto classes (no LM head).

        dtype None: `default_dtype(device)`. attn_implementation: transformers' attention ("sdpa", "eager",
        "flex_attention"; None: transformers' default); every one of them gets the padding mask.
        """
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
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

    def tokenize(self, prompts: Sequence[str], *, padding: Padding = "max_length") -> Tokens:
        """CPU tokens of `prompts`, padded to `max_length` (truncated to it) or to the longest prompt.

        Thread-safe. Newlines become spaces. An empty prompt never yields zero tokens: at least one pad
        token is kept and attended to, since a model sees no key at all otherwise.
        """
        prompts = tuple(p.replace("\n", " ") for p in prompts)
        with self._lock:
            batch = self.tokenizer(list(prompts), padding=padding, truncation=padding == "max_length",
                                   max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
        if ids.shape[1] == 0:  # every prompt empty and padding to the longest: one pad token each
            ids = torch.full((len(prompts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        mask[mask.sum(dim=1) == 0, 0] = 1
        return Tokens(prompts=prompts, ids=ids, mask=mask, padding=padding)

    @torch.no_grad()
    def encode_tokens(self, tokens: Tokens) -> Tensor:
        """Hidden states (B, T, hidden) on the encoder's device; ids and mask copied with non_blocking=True.

        "max_length" rows of the empty prompt come from its states computed once; the model runs on the
        other rows only (or on the LRU cache's misses, with cache_size > 0).
        """
        if tokens.padding != "max_length":
            return self._run(tokens.ids, tokens.mask)
        empty = self._empty_rows(tokens)
        if self.cache_size > 0:
            return self._cached(tokens, empty)
        if not any(empty):
            return self._run(tokens.ids, tokens.mask)
        rows = [i for i, e in enumerate(empty) if not e]
        states = self._run(_rows(tokens.ids, rows), _rows(tokens.mask, rows)) if rows else None
        return _interleave(states, self._empty_states(tokens, empty), empty)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], *, padding: Padding = "max_length") -> Tensor:
        """Hidden states (B, T, hidden): T = max_length for training, the longest prompt for inference."""
        return self.encode_tokens(self.tokenize(prompts, padding=padding))

    def _run(self, ids: Tensor, mask: Tensor) -> Tensor:
        device = self.device
        return encode_ids(self.model, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))

    def _empty_rows(self, tokens: Tokens) -> list[bool]:
        """Rows tokenised as the empty prompt (the pad token alone, attended): read on the CPU tensors."""
        empty = (tokens.mask.sum(dim=1) == 1) & (tokens.ids[:, 0] == self.tokenizer.pad_token_id)
        return empty.tolist()

    def _empty_states(self, tokens: Tokens, empty: list[bool]) -> Tensor:
        """The empty prompt's states (T, hidden), encoded from one of its rows the first time."""
        param = next(self.model.parameters())
        key = (param.device, param.dtype, tokens.ids.shape[1])
        if key not in self._empty:
            i = empty.index(True)
            self._empty[key] = self._run(tokens.ids[i:i + 1], tokens.mask[i:i + 1])[0]
        return self._empty[key]

    def _cached(self, tokens: Tokens, empty: list[bool]) -> Tensor:
        """Through the LRU cache of caption states: the distinct misses are encoded once each."""
        prompts = tokens.prompts
        misses = dict.fromkeys(p for p, e in zip(prompts, empty) if not e and p not in self._cache)
        if misses:
            rows = [prompts.index(p) for p in misses]  # each miss's first row
            for i, states in zip(rows, self._run(_rows(tokens.ids, rows), _rows(tokens.mask, rows))):
                self._cache[prompts[i]] = states
        out = torch.stack([self._empty_states(tokens, empty) if e else self._cache[p] for p, e in zip(prompts, empty)])
        for prompt in dict.fromkeys(p for p, e in zip(prompts, empty) if not e):
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


def _rows(t: Tensor, rows: list[int]) -> Tensor:
    """`t`'s rows, pinned again when `t` is (a copy from pageable memory would wait for the GPU)."""
    out = t[rows]
    return out.pin_memory() if t.is_pinned() else out


def _interleave(states: Tensor | None, empty_states: Tensor, empty: list[bool]) -> Tensor:
    """Batch rows in order: `states`' rows where not empty, `empty_states` where empty. Concatenated by runs
    of rows, so no index tensor has to be copied to the device."""
    pieces, taken = [], 0
    for is_empty, run in itertools.groupby(empty):
        n = len(list(run))
        if is_empty:
            pieces.append(empty_states.expand(n, -1, -1))
        else:
            pieces.append(states[taken:taken + n])
            taken += n
    return torch.cat(pieces)
