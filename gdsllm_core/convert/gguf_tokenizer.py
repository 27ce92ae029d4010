"""Build an HF `tokenizers` tokenizer.json from a GGUF's `tokenizer.ggml.*` metadata (for every GGUF converter).

Two vocabularies occur:
- `gpt2`: byte-level BPE with merges (LLaMA 3, Qwen, Mistral-Nemo, SmolLM2, ...). The text is split before BPE by
  the regexes of `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp lists them (the originals from the models'
  tokenizer.json where llama.cpp rewrote one for its own regex engine); a pre-tokenizer not in PRE_TOKENIZERS is
  refused, since another split gives other tokens than the model was trained on.
- `llama`: SentencePiece-style BPE with scores and byte fallback (LLaMA 2, Mistral v0.1); merges are rebuilt from
  the scores the way transformers does (`generate_merges`); the dummy-prefix space is added as llama.cpp does.
Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens. The
tokenizer.json adds no BOS itself: the engine adds it when `TokenizerInfo.add_bos` says so.
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from gdsllm_core.errors import ConversionError, UnsupportedTokenizerError
from gdsllm_core.layout.manifest import TokenizerInfo

CONTROL, USER_DEFINED = 3, 4
TOKENIZER_FILE = "tokenizer.json"
# Tokens llama.cpp also treats as end-of-generation when the vocabulary marks them as control tokens.
EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> the regexes that split the text, applied one after the other (llama-vocab.cpp)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "roberta-bpe", "exaone4"), (_GPT2,)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), (_QWEN2,)),
    "qwen35": (_QWEN35,),
    "tekken": (_TEKKEN,),
    "smollm": (r"\p{N}", _GPT2),  # single digits, then GPT-2's split
    # what llama.cpp uses for `default` and when the key is missing (older GGUFs)
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
}
# pre-tokenizers whose whole pieces are looked up in the vocabulary before any merge (llama.cpp's ignore_merges)
IGNORE_MERGES = ("tekken",)


def byte_level_pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer of a GGUF `tokenizer.ggml.pre`: its regex splits, then the byte-level map."""
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedTokenizerError(
            f"the GGUF's pre-tokenizer {pre!r} is not known to gdsllm (known: {', '.join(sorted(PRE_TOKENIZERS))})",
            "splitting its text another way would give other tokens than the model was trained on: convert the "
            "model's Hugging Face folder (tokenizer.json) instead, or report the pre-tokenizer")
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in PRE_TOKENIZERS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level(meta: dict) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    pre = meta.get("tokenizer.ggml.pre") or "default"
    pre_tokenizer = byte_level_pre_tokenizer(pre)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False, ignore_merges=pre in IGNORE_MERGES))
    tokenizer.pre_tokenizer = pre_tokenizer
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
        raise UnsupportedTokenizerError(f"the GGUF's tokenizer type {kind!r} is not supported (supported: gpt2, llama)",
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
