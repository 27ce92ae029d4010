"""A weightless forward pass: the next token is always the last one seen (so a model "echoes" its prompt's end)."""

import torch


class EchoForward:
    def __init__(self, entry, options):
        self.vocab_size = int(entry.manifest.config["vocab_size"])
        self.max_context = int(entry.manifest.config.get("context_length", 2048))
        self.device = torch.device("cpu")

    def new_cache(self, max_tokens):
        return []

    def _logits(self, token: int) -> torch.Tensor:
        logits = torch.zeros(self.vocab_size)
        logits[token] = 1.0
        return logits

    def prefill(self, tokens, cache, all_logits=False):
        cache.extend(int(t) for t in tokens)
        rows = torch.stack([self._logits(int(t)) for t in tokens])
        return rows if all_logits else rows[-1]

    def decode(self, tokens, caches):
        for token, cache in zip(tokens, caches, strict=True):
            cache.append(int(token))
        return torch.stack([self._logits(int(t)) for t in tokens])

    def stats(self):
        return {}

    def close(self):
        pass
