"""Reading a Qwen3.5-MoE checkpoint folder (HF safetensors or mlx_lm affine) tensor by tensor.

`CheckpointSource.plan(spec)` finds and shape-checks one logical tensor without reading it (so a bad checkpoint is
refused before anything is written); `read(plan)` then loads its bytes, slicing fused 3-D expert tensors lazily."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gdsllm_core.api import ConversionError, UnsupportedQuantError, read_json
from gdsllm_qwen_moe import affine
from gdsllm_qwen_moe.config import MODEL_TYPES, QwenMoeConfig
from gdsllm_qwen_moe.names import LAYER_NAMES, TensorSpec, skipped_kind, strip_prefix, to_internal

_FUSED = {"ffn_gate": ("ffn_gate_exps", "ffn_gate_up_exps", 0), "ffn_up": ("ffn_up_exps", "ffn_gate_up_exps", 1),
          "ffn_down": ("ffn_down_exps", None, 0)}
_HF_LAYER_NAMES = {v: k for k, v in LAYER_NAMES.items()}


@dataclass
class Part:
    """Where one stored array comes from: a checkpoint key, optionally indexed (expert e, row half)."""

    key: str
    expert: int | None = None
    half: int | None = None  # 0 = first half of the rows (gate), 1 = second half (up) of a fused gate_up tensor
    rows: int = 0


@dataclass
class Plan:
    """How to read one logical tensor: float (`weight` only) or affine (`weight` + `scales` + `biases`)."""

    spec: TensorSpec
    weight: Part
    scales: Part | None = None
    biases: Part | None = None
    bits: int = 0
    group_size: int = 0


def is_checkpoint(path: Path) -> bool:
    """A folder with config.json naming a Qwen3.5-MoE model and at least one .safetensors file."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file() or not any(path.glob("*.safetensors")):
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    archs = raw.get("architectures") or []
    return raw.get("model_type") in MODEL_TYPES or any(a.startswith("Qwen3_5Moe") for a in archs)


def hf_name(internal: str) -> str:
    """The HF checkpoint name of an internal tensor name, for error messages."""
    parts = internal.split(".")
    if parts[0] != "blk":
        return {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                "output": "lm_head.weight"}[parts[0]]
    if parts[2] == "expert":
        proj = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}[parts[4]]
        return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{proj}.weight"
    module = _HF_LAYER_NAMES[parts[2]]
    return f"model.layers.{parts[1]}.{module}" + ("" if module.endswith(("A_log", "dt_bias")) else ".weight")


class CheckpointSource:
    """The tensors of one checkpoint folder, indexed by internal name. Close it (or use `with`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.raw_config = read_json(self.folder / "config.json")
        self.config = QwenMoeConfig.from_hf(self.raw_config)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.folder} has no .safetensors files", "download the model's weights too")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._file_of: dict[str, object] = {}
        self.index: dict[tuple[str, str], str] = {}
        self.skipped: dict[str, int] = {}
        unknown = []
        for handle in self._handles:
            for key in handle.keys():
                self._file_of[key] = handle
                kind = skipped_kind(key)
                if kind:
                    self.skipped[kind] = self.skipped.get(kind, 0) + 1
                    continue
                internal = to_internal(key)
                if internal is None:
                    unknown.append(key)
                    continue
                self.index[internal] = key
        if unknown:
            raise ConversionError(f"{self.folder}: unknown tensor {unknown[0]}" +
                                  (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                                  "is this a Qwen3.5-MoE checkpoint? gdsllm reads HF and mlx_lm layouts")
        quant = self.raw_config.get("quantization") or self.raw_config.get("quantization_config") or {}
        self.quantization = quant if "bits" in quant or any(isinstance(v, dict) for v in quant.values()) else {}
        # per-path overrides, by the text model's own module path (mlx_lm names them after its module tree)
        self._overrides = {strip_prefix(path): value for path, value in self.quantization.items()
                           if isinstance(value, dict)}
        conv = next((k for (name, _), k in self.index.items() if name.endswith("ssm_conv1d")), None)
        # mlx_lm stores conv1d as [C, K, 1] with norms already holding 1 + w; HF stores [C, 1, K] and w
        self.norms_hold_one_plus_w = conv is not None and self.shape(conv)[-1] == 1

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._file_of.clear()

    def shape(self, key: str) -> list[int]:
        return list(self._file_of[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._file_of[key].get_slice(key).get_dtype()

    # planning -----------------------------------------------------------------------------------------------
    def plan(self, spec: TensorSpec) -> Plan:
        """Locate `spec` in the checkpoint and check its shapes and quantization; raise naming the tensor if wrong."""
        weight, scales, biases = self._locate(spec)
        if scales is None:
            self._check(weight, spec.shape, spec)
            return Plan(spec, weight)
        if biases is None:
            raise ConversionError(f"tensor {weight.key}: has scales but no biases",
                                  "only MLX affine quantization (weight + scales + biases) is supported")
        bits, group_size = self._quant_format(weight.key, spec)
        rows, cols = spec.shape
        self._check(weight, (rows, affine.packed_cols(cols, bits)), spec, f" ({bits}-bit packed)")
        self._check(scales, (rows, cols // group_size), spec, f" (group size {group_size})")
        self._check(biases, (rows, cols // group_size), spec, f" (group size {group_size})")
        return Plan(spec, weight, scales, biases, bits, group_size)

    def _locate(self, spec: TensorSpec) -> tuple[Part, Part | None, Part | None]:
        """(weight, scales, biases) parts of a spec: its own tensor, or its slice of a fused / switch tensor."""
        stem, expert, half, rows = spec.name, None, None, 0
        if not self._has(stem):
            parts = stem.split(".")
            if len(parts) == 5 and parts[2] == "expert":
                own, fused, fused_half = _FUSED[parts[4]]
                expert, rows = int(parts[3]), spec.shape[0]
                if self._has(f"blk.{parts[1]}.{own}"):
                    stem = f"blk.{parts[1]}.{own}"
                elif fused and self._has(f"blk.{parts[1]}.{fused}"):
                    stem, half = f"blk.{parts[1]}.{fused}", fused_half
            if not self._has(stem):
                raise ConversionError(f"{self.folder}: tensor {hf_name(spec.name)} is missing",
                                      "the checkpoint is incomplete: re-download it (all *.safetensors shards)")
        weight_key = self.index.get((stem, "weight")) or self.index[(stem, "")]
        extras = [Part(self.index[(stem, s)], expert, half, rows) if (stem, s) in self.index else None
                  for s in ("scales", "biases")]
        return Part(weight_key, expert, half, rows), extras[0], extras[1]

    def _has(self, stem: str) -> bool:
        return (stem, "weight") in self.index or (stem, "") in self.index

    def _check(self, part: Part, expected: tuple[int, ...], spec: TensorSpec, what: str = "") -> None:
        actual = full = self.shape(part.key)
        where = ""
        if part.expert is not None:
            where = f" (expert {part.expert}{'' if part.half is None else ', ' + ('gate', 'up')[part.half] + ' half'}" \
                    f" of {full})"
            if len(actual) != 3 or actual[0] <= part.expert:
                raise ConversionError(f"tensor {part.key} has shape {actual}: expected [experts, ...] with expert "
                                      f"{part.expert} present", "the checkpoint does not match its config.json")
            actual = actual[1:]
            if part.half is not None:
                actual = [actual[0] // 2, *actual[1:]] if actual[0] % 2 == 0 else actual
        if spec.kind == "conv" and len(actual) == 3:  # HF [C, 1, K] or mlx [C, K, 1]
            actual = [actual[0], actual[1] * actual[2]]
        if tuple(actual) != tuple(expected):
            raise ConversionError(
                f"tensor {part.key} has shape {list(actual)}{where}, expected {list(expected)}{what} for {spec.name}",
                "the checkpoint does not match its config.json")

    def _quant_format(self, key: str, spec: TensorSpec) -> tuple[int, int]:
        module = key.rsplit(".", 1)[0] if key.endswith(".weight") else key
        override = self._overrides.get(strip_prefix(module))
        settings = override if override is not None else self.quantization
        if not settings or "bits" not in settings:
            raise ConversionError(f"tensor {key} is quantized but config.json gives no bits for it",
                                  "add a \"quantization\": {\"bits\": …, \"group_size\": …} section")
        mode = settings.get("mode", "affine")
        if mode != "affine":
            raise UnsupportedQuantError(f"tensor {key}: MLX quantization mode {mode!r} is not supported",
                                        "use an affine-quantized checkpoint (mlx_lm.convert -q --q-mode affine)")
        bits, group_size = int(settings["bits"]), int(settings.get("group_size", 64))
        affine.check_format(bits, group_size, key)
        return bits, group_size

    # reading ------------------------------------------------------------------------------------------------
    def read(self, part: Part) -> torch.Tensor:
        sliced = self._file_of[part.key].get_slice(part.key)
        if part.expert is None:
            return sliced[:]
        if part.half is None:
            return sliced[part.expert]
        start = part.half * part.rows
        return sliced[part.expert, start:start + part.rows]
