"""The tokenizer of a Hugging Face checkpoint folder, as a manifest keeps it."""

import json
from pathlib import Path

from gdsllm_core.convert import read_json
from gdsllm_core.layout.manifest import TokenizerInfo


def token_ids(value) -> list[int]:
    """A config's token id field (an int, a list of ints or null) as a list."""
    if value is None:
        return []
    return [int(i) for i in (value if isinstance(value, list) else [value]) if i is not None]


def read_hf_tokenizer(folder: Path, eos_ids: list[int], bos_id: int | None) -> tuple[TokenizerInfo, dict[str, bytes]]:
    """tokenizer.json (preferred) or tokenizer.model with the chat template (chat_template.jinja, else
    tokenizer_config.json's) and the end-of-sequence ids (generation_config.json's, else `eos_ids` from config.json).

    A BOS-adding post-processor is removed from tokenizer.json: the engine adds BOS when `add_bos` says so. A folder
    with neither file gives kind "none" (weights only); the engine says so when such a model is loaded."""
    folder = Path(folder)
    tok_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    eos_ids = token_ids(generation.get("eos_token_id")) or list(eos_ids)
    bos_id = bos_id if bos_id is not None else generation.get("bos_token_id")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    else:
        template = tok_config.get("chat_template")
    add_bos = tok_config.get("add_bos_token")
    if (folder / "tokenizer.json").is_file():
        data = read_json(folder / "tokenizer.json")
        adds_bos = bos_id is not None and _post_processor_adds_bos(data.get("post_processor"))
        data["post_processor"] = None
        kind, file, payload = "hf", "tokenizer.json", json.dumps(data, ensure_ascii=False).encode()
        add_bos = adds_bos if add_bos is None else add_bos
    elif (folder / "tokenizer.model").is_file():
        kind, file, payload = "sentencepiece", "tokenizer.model", (folder / "tokenizer.model").read_bytes()
        add_bos = True if add_bos is None else add_bos
    else:
        return TokenizerInfo(kind="none", file="", bos_id=bos_id, eos_ids=eos_ids, chat_template=template), {}
    info = TokenizerInfo(kind=kind, file=file, bos_id=bos_id, eos_ids=eos_ids, add_bos=bool(add_bos),
                         chat_template=template)
    return info, {file: payload}


def _post_processor_adds_bos(post: dict | None) -> bool:
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p) for p in post.get("processors", []))
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and "SpecialToken" in single[0]
