"""The prefix cache: the caches of finished sequences, kept so that a later request whose prompt starts with the
same tokens (the next turn of a conversation, a shared system prompt) computes only what follows them.

One entry is one finished sequence of one model: the tokens its cache holds and the cache itself. A new request
takes the entry with the longest common prefix; the forward pass cuts the cache back to that prefix
(`ForwardPass.reuse_cache`) and the request continues it, so the entry leaves the pool (a request that finishes
puts its own cache back). Entries are dropped least recently used first while the pool exceeds its byte budget
(GDSLLM_PREFIX_CACHE)."""

import collections
from dataclasses import dataclass
from typing import Any

import torch

MIN_SHARED_TOKENS = 1  # an entry is worth taking when it shares at least this many tokens with the prompt


@dataclass
class CachedPrefix:
    model: str
    tokens: list[int]  # what the cache holds, in order
    cache: Any
    nbytes: int


def cache_nbytes(cache: Any) -> int:
    """Bytes of the tensors a cache holds (its attributes, dict values and their objects' tensors)."""
    seen: set[int] = set()

    def walk(value: Any, depth: int) -> int:
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return value.untyped_storage().nbytes()
        if depth > 3:
            return 0
        if isinstance(value, dict):
            return sum(walk(item, depth + 1) for item in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(item, depth + 1) for item in value)
        if hasattr(value, "__dict__"):
            return sum(walk(item, depth + 1) for item in vars(value).values())
        return 0

    return walk(cache, 0)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Finished sequences' caches under a byte budget (0 keeps nothing). Used by the engine's worker thread only."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, CachedPrefix] = collections.OrderedDict()  # oldest first
        self._next_key = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def put(self, model: str, tokens: list[int], cache: Any) -> None:
        """Keep `cache` (holding `tokens`), dropping the least recently used entries to stay within the budget."""
        if self.budget_bytes <= 0 or not tokens:
            return
        nbytes = cache_nbytes(cache)
        if nbytes > self.budget_bytes:
            return
        self._entries[self._next_key] = CachedPrefix(model, list(tokens), cache, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def take(self, model: str, prompt: list[int]) -> tuple[CachedPrefix, int] | None:
        """The entry of `model` sharing the longest prefix with `prompt` (removed from the pool) and that length."""
        best, best_key, best_shared = None, None, MIN_SHARED_TOKENS - 1
        for key, entry in self._entries.items():
            if entry.model != model:
                continue
            shared = shared_prefix(entry.tokens, prompt)
            if shared > best_shared:
                best, best_key, best_shared = entry, key, shared
        if best is None:
            self.misses += 1
            return None
        del self._entries[best_key]
        self.nbytes -= best.nbytes
        return best, best_shared

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}
