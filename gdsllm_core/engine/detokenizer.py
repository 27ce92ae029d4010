"""Streaming detokenization: text appears as soon as it is complete UTF-8, and no leading space is lost.

Each step decodes a short window of ids twice, with and without the new ones, and emits the difference (the
prefix-offset method of vLLM and TGI): decoding a token alone would drop SentencePiece's leading "▁" and split
multi-byte characters whose bytes come in separate tokens."""

from gdsllm_core.engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens decoded before the first new one, so its leading space survives


class IncrementalDetokenizer:
    """Feed token ids with `add(id) -> new text`; `flush()` returns what is still held back at the end."""

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = list(context_ids or [])[-CONTEXT_TOKENS:]
        self.prefix_offset = 0  # start of the window decoded for reference
        self.read_offset = len(self.ids)  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back tail (an incomplete character at the very end comes out as U+FFFD, as a full decode has it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) and not final:
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # the last character's bytes are not all there yet
        new_text = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text
