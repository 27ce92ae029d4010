"""Tokenizer: one interface over HF `tokenizer.json` (through `tokenizers`) and SentencePiece `tokenizer.model`."""

import re
from pathlib import Path

from gdsllm_core.errors import CorruptModelError
from gdsllm_core.layout.manifest import TokenizerInfo
from gdsllm_core.layout.store import ModelEntry

# End-of-turn tokens that chat templates close a turn with; like llama.cpp, generation also stops on these when the
# vocabulary has them as special tokens, even if the model's metadata names only the plain EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """encode/decode plus the ids the engine needs: `bos_id`, `eos_ids` (EOS and end-of-turn), special tokens."""

    def __init__(self, info: TokenizerInfo, backend: "_HfBackend | _SentencePieceBackend"):
        self.info = info
        self._backend = backend
        self.bos_id = info.bos_id
        self.add_bos = info.add_bos and info.bos_id is not None
        specials = backend.special_tokens()
        self.eos_ids: frozenset[int] = frozenset(info.eos_ids) | frozenset(
            specials[token] for token in END_OF_TURN_TOKENS if token in specials)
        self.chat_template = info.chat_template

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> "Tokenizer":
        return cls.from_info(entry.manifest.tokenizer, entry.path)

    @classmethod
    def from_info(cls, info: TokenizerInfo, folder: Path) -> "Tokenizer":
        path = Path(folder) / info.file
        if not path.is_file():
            raise CorruptModelError(f"tokenizer file {path} is missing", "re-convert the model with `gdsllm pull`")
        if info.kind == "hf":
            backend = _HfBackend(path)
        elif info.kind == "sentencepiece":
            backend = _SentencePieceBackend(path)
        else:
            raise CorruptModelError(f"unknown tokenizer kind {info.kind!r} in {folder}",
                                    "expected 'hf' or 'sentencepiece'; re-convert the model")
        return cls(info, backend)

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        ids = self.info.eos_ids or sorted(self.eos_ids)
        return self.id_to_token(ids[0]) if ids else None

    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return self._backend.special_tokens()

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids. `add_special` prepends BOS when
        the model asks for it and the text does not already start with it."""
        ids = self._backend.encode(text)
        if add_special and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special)

    def hf_json(self) -> str | None:
        """The HF `tokenizer.json` text (None for SentencePiece), for llguidance."""
        return self._backend.tokenizer.to_str() if isinstance(self._backend, _HfBackend) else None


class _HfBackend:
    def __init__(self, path: Path):
        import tokenizers

        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CorruptModelError(f"cannot read tokenizer {path}: {exc}", "re-convert the model") from exc
        self._specials = {token.content: token_id
                          for token_id, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        return self._specials

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)


class _SentencePieceBackend:
    """SentencePiece does not parse control tokens written in text, so the text is split on them first."""

    def __init__(self, path: Path):
        import sentencepiece

        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise CorruptModelError(f"cannot read tokenizer {path}: {exc}", "re-convert the model") from exc
        processor = self.processor
        self._specials = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())
                          if processor.is_control(i) and processor.id_to_piece(i)}
        self._special_ids = frozenset(self._specials.values())
        names = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def special_tokens(self) -> dict[str, int]:
        return self._specials

    def id_to_token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.processor.encode(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self.processor.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.processor.decode([i for i in ids if i not in self._special_ids])
        pieces, run = [], []
        for token_id in ids:
            if token_id in self._special_ids:
                pieces.append(self.processor.decode(run) + self.processor.id_to_piece(token_id))
                run = []
            else:
                run.append(token_id)
        return "".join(pieces) + self.processor.decode(run)
