"""How LLaMA tensors are grouped into extents: one per decoder layer (`blk.{i}`), plus `token_embd`,
`output_norm` and `output` (absent when the embeddings are tied)."""

from collections.abc import Iterable

from gdsllm_core.api import ConversionError, ExtentRole

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


class LlamaLayout:
    """Extent names and order for a dense decoder."""

    @staticmethod
    def extent_of(tensor_name: str) -> str:
        """`blk.3.attn_q.weight` -> `blk.3`; `token_embd.weight` -> `token_embd`."""
        parts = tensor_name.split(".")
        if parts[0] == "blk" and len(parts) > 2:
            return f"blk.{parts[1]}"
        if parts[0] in ("token_embd", "output_norm", "output"):
            return parts[0]
        raise ConversionError(f"tensor {tensor_name!r} does not belong to any LLaMA extent")

    @staticmethod
    def role_of(extent_name: str) -> tuple[ExtentRole, int]:
        """(role, layer index or -1) the layout declares for one of its extents."""
        if extent_name.startswith("blk."):
            return ExtentRole.LAYER, int(extent_name.split(".")[1])
        return (ExtentRole.EMBEDDINGS if extent_name == "token_embd" else ExtentRole.HEAD), -1

    @staticmethod
    def extent_order(n_layers: int, tied: bool) -> list[str]:
        """The order extents are written in: the order the forward pass reads them."""
        return ["token_embd", *(f"blk.{i}" for i in range(n_layers)), "output_norm", *([] if tied else ["output"])]

    @staticmethod
    def ordered(tensor_names: Iterable[str]) -> list[str]:
        """An extent's tensors in a fixed order (LAYER_TENSORS for layers), whatever the checkpoint's order."""
        rank = {part: i for i, part in enumerate(LAYER_TENSORS)}
        return sorted(tensor_names, key=lambda n: rank.get(n.split(".")[2] if n.startswith("blk.") else "", -1))

    @classmethod
    def group(cls, tensor_names: Iterable[str], n_layers: int, tied: bool) -> dict[str, list[str]]:
        """extent name -> its tensor names, both in write order; every layer must have all LAYER_TENSORS."""
        groups: dict[str, list[str]] = {name: [] for name in cls.extent_order(n_layers, tied)}
        for tensor_name in tensor_names:
            extent = cls.extent_of(tensor_name)
            if extent not in groups:
                raise ConversionError(f"tensor {tensor_name!r} lies outside the model's {n_layers} layers")
            groups[extent].append(tensor_name)
        groups = {extent: cls.ordered(members) for extent, members in groups.items()}
        missing = [name for name, members in groups.items() if not members]
        missing += [f"{extent}.{part}.weight" for extent, members in groups.items() if extent.startswith("blk.")
                    for part in LAYER_TENSORS if f"{extent}.{part}.weight" not in members]
        if missing:
            raise ConversionError(f"the checkpoint lacks {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}",
                                  "the checkpoint is incomplete: re-download it")
        return groups
