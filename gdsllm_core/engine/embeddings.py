"""Embeddings: the final hidden states of a text (`ForwardPass.hidden_states`), pooled per the model's convention and
L2-normalised as ollama's /api/embed does."""

from concurrent.futures import Future
from dataclasses import dataclass, field

import msgspec
import torch

from gdsllm_core.errors import BadRequestError
from gdsllm_core.layout.manifest import Manifest

# GGUF's `<arch>.pooling_type` values (llama.cpp's enum llama_pooling_type) and the names gdsllm accepts too
POOLING_NAMES = {0: "last", 1: "mean", 2: "cls", 3: "last", "none": "last", "mean": "mean", "cls": "cls",
                 "last": "last"}


def pooling_of(manifest: Manifest) -> str:
    """"mean", "cls" or "last": the model's `pooling_type` (GGUF's number or a name) when its config has one;
    otherwise "last", the last token's state, which is what ollama returns for a generative model (llama.cpp's
    pooling "none")."""
    value = manifest.config.get("pooling_type", manifest.config.get("pooling"))
    if value is None:
        return "last"
    if value not in POOLING_NAMES:
        raise BadRequestError(f"the model's pooling_type {value!r} is not one gdsllm knows",
                              "use mean, cls or last in the manifest's config")
    return POOLING_NAMES[value]


def pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector from hidden states [T, D]: their mean, the first row (cls) or the last row."""
    if pooling == "mean":
        return hidden.mean(dim=0)
    return hidden[0] if pooling == "cls" else hidden[-1]


def finish(vector: torch.Tensor, normalize: bool, dimensions: int | None) -> list[float]:
    """The first `dimensions` components (all when None), L2-normalised when asked (ollama: after cutting)."""
    vector = vector.to("cpu", torch.float32)
    if dimensions is not None:
        if dimensions > vector.numel():
            raise BadRequestError(f"dimensions {dimensions} is more than the model's {vector.numel()}",
                                  f"ask for at most {vector.numel()}")
        vector = vector[:dimensions]
    if normalize:
        vector = vector / vector.norm().clamp_min(1e-12)
    return vector.tolist()


class Embeddings(msgspec.Struct):
    """One vector per input, the tokens run in total and the timings (nanoseconds)."""

    vectors: list[list[float]]
    prompt_tokens: int
    load_ns: int
    total_ns: int


@dataclass
class EmbedJob:
    """Token ids of each input, for the engine's worker; the future gets the pooled vectors (float32, on the CPU)."""

    model: str
    inputs: list[list[int]]
    pooling: str
    future: Future = field(default_factory=Future)

    def run(self, forward) -> None:
        try:
            vectors = []
            for ids in self.inputs:
                hidden = forward.hidden_states(torch.tensor(ids, dtype=torch.long, device=forward.device))
                vectors.append(pool(hidden.float(), self.pooling).cpu())
            self.future.set_result(vectors)
        except BaseException as exc:
            self.future.set_exception(exc)
