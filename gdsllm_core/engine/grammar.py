"""Constrained decoding with llguidance: a request's Grammar becomes a matcher over the model's vocabulary; each step
the matchers of a batch's constrained rows fill a packed token bitmask on the host (llguidance's Rust threads, the
GIL released, while the forward pass runs), the bitmask goes to the logits' device without a sync and masks the
disallowed tokens to -inf. Rows without a grammar keep every bit set."""

import json
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.torch
import torch

from gdsllm_core.engine.tokenizer import Tokenizer
from gdsllm_core.errors import BadRequestError, GdsllmError
from gdsllm_core.types import Grammar

# JSON is generated compact-but-readable (", " and ": " separators, no free whitespace): models write it that way,
# and free whitespace lets small models loop on newlines forever
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = Grammar("json_schema", "{\"type\": \"object\"}")  # ollama's format "json", OpenAI's json_object
BITS = 32  # tokens per word of the packed bitmask


def json_schema_grammar(schema: dict) -> Grammar:
    return Grammar("json_schema", json.dumps(schema))


def grammar_text(grammar: Grammar) -> str:
    """llguidance's grammar text for a Grammar; BadRequestError when the schema is not a JSON object."""
    if grammar.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(grammar.source)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise BadRequestError(f"the JSON schema is not a JSON object: {exc}", "send the schema as an object") from exc


class GrammarCompiler:
    """One model's llguidance tokenizer (built on first use: ~0.2 s for a 50k vocabulary) and its matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer: llguidance.LLTokenizer | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            self._lltokenizer = llguidance.LLTokenizer(_wrapped(self.tokenizer), n_vocab=self.vocab_size,
                                                       eos_token=sorted(self.tokenizer.eos_ids))
        return self._lltokenizer

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher; BadRequestError naming the problem when the grammar or schema is invalid."""
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar_text(grammar), log_level=0)
        if matcher.is_error():
            raise BadRequestError(f"the {'JSON schema' if grammar.kind == 'json_schema' else 'grammar'} cannot be "
                                  f"enforced: {matcher.get_error()}", "simplify or fix the schema")
        return matcher


def _wrapped(tokenizer: Tokenizer):
    """What LLTokenizer takes: the HF tokenizer.json text, or a TokenizerWrapper over SentencePiece pieces."""
    json_text = tokenizer.hf_json()
    if json_text is not None:
        return json_text
    return llguidance.TokenizerWrapper(_PieceTokenizer(tokenizer))


class _PieceTokenizer:
    """SentencePiece pieces as bytes ("▁" is a space, "<0xNN>" a byte), for llguidance's TokenizerWrapper."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = min(tokenizer.eos_ids)
        self.bos_token_id = tokenizer.bos_id
        specials = set(tokenizer.special_tokens().values())
        self.special_token_ids = sorted(specials)
        self.tokens = [_piece_bytes(tokenizer.id_to_token(i), i in specials) for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=False)


def _piece_bytes(piece: str, special: bool) -> bytes:
    if not special and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


class BatchMasks:
    """The packed bitmask of a batch ([B, ceil(V/32)] int32, pinned when the logits are on a GPU), filled by a
    background thread so the host work overlaps the forward pass."""

    def __init__(self, vocab_size: int, pinned: bool):
        self.vocab_size = vocab_size
        self.pinned = pinned
        self._executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdsllm-grammar")

    def start(self, matchers: list) -> Future | None:
        """Begin filling the masks of `matchers` (None: an unconstrained row); None when no row is constrained."""
        if all(matcher is None for matcher in matchers):
            return None
        return self._thread.submit(self._fill, matchers)

    def _fill(self, matchers: list) -> torch.Tensor:
        words = (self.vocab_size + BITS - 1) // BITS
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32, pin_memory=self.pinned)
        rows = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
        llguidance.torch.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        for matcher, _ in rows:
            if matcher.is_error():
                raise GdsllmError(f"the grammar matcher failed: {matcher.get_error()}")
        return bitmask

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens whose bit is 0 in `bitmask` [B, ceil(V/32)] (host) set to -inf; the copy to the
    logits' device is asynchronous."""
    mask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(BITS, dtype=torch.int32, device=logits.device)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).reshape(mask.shape[0], -1)[:, :logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


def advance(matcher, token: int) -> None:
    """Feed the sampled token to the matcher; GdsllmError if it refuses it (it cannot, once masked)."""
    if not matcher.consume_token(token):
        raise GdsllmError(f"the grammar matcher refused token {token}: {matcher.get_error()}")
