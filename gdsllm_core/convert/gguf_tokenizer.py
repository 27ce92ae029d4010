"""Build an HF `tokenizers` tokenizer.json from a GGUF's `tokenizer.ggml.*` metadata (shared by every plugin that reads GGUF).

Two vocabularies occur in LLaMA-family GGUFs:
- `gpt2`: byte-level BPE with merges (LLaMA 3, SmolLM2, ...); the split regex follows `tokenizer.ggml.pre`.
- `llama`: SentencePiece-style BPE with scores and byte fallback (LLaMA 2, Mistral v0.1); merges are rebuilt from
  the scores the way transformers does (`generate_merges`); the dummy-prefix space is added as llama.cpp does.
Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens. The
tokenizer.json adds no BOS itself: the engine adds it when `TokenizerInfo.add_bos` says so.
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.manifest import TokenizerInfo

CONTROL, USER_DEFINED = 3, 4
TOKENIZER_FILE = "tokenizer.json"
# Tokens llama.cpp also treats as end-of-generation when the vocabulary marks them as control tokens.
EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral")


def _byte_level_pre_tokenizer(pre: str | None):
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # as SmolLM2's own tokenizer.json: single digits, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt-2", "default"


def _byte_level(meta: dict) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best-scored merged token first (transformers'
    `generate_merges` with vocab scores)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: dict) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ConversionError("the GGUF's SentencePiece vocabulary has no tokenizer.ggml.scores",
                              "the file is incomplete: re-download it")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                     merges=_merges_from_scores(tokens, scores), unk_token=tokens[unk_id],
                                     fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # Like llama.cpp (and sentencepiece's add_dummy_prefix): every text fragment gets a leading "▁", also when it
    # already starts with a space and after each special token; spaces become "▁". (Metaspace would skip the
    # prefix for text that starts with a space.)
    prepend = [normalizers.Prepend("\u2581")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence(prepend + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *strip])
    return tokenizer


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def build_tokenizer(meta: dict) -> tuple[TokenizerInfo, dict[str, bytes]]:
    """(TokenizerInfo, {"tokenizer.json": bytes}) from GGUF metadata (key -> value)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS or "tokenizer.ggml.tokens" not in meta:
        raise ConversionError(f"the GGUF's tokenizer type {kind!r} is not supported (supported: gpt2, llama)",
                              "use a GGUF with a BPE (gpt2) or SentencePiece (llama) vocabulary")
    tokenizer = _BUILDERS[kind](meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind_id in zip(tokens, types, strict=True) if kind_id == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind_id in zip(tokens, types, strict=True) if kind_id == USER_DEFINED])
    eos_ids = [meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if meta.get(key) is not None]
    eos_ids += [i for i, (t, kind_id) in enumerate(zip(tokens, types, strict=True)) if kind_id == CONTROL and t in EOG_TEXTS]
    info = TokenizerInfo(
        kind="hf", file=TOKENIZER_FILE, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=list(dict.fromkeys(int(i) for i in eos_ids)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=meta.get("tokenizer.chat_template"))
    return info, {TOKENIZER_FILE: tokenizer.to_str().encode()}
