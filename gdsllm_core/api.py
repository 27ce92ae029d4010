"""The public API for plugins: everything a plugin may import from core, and nothing deeper (a test keeps it so).

    from gdsllm_core.api import hookimpl, ModelWriter, ExtentRole, DecoderModel, RuntimeOptions, rms_norm

Names are resolved on first use (PEP 562), so a plugin's `plugin.py` that imports only `hookimpl` stays cheap to
import (`gdsllm plugins` lists plugins without loading torch or any model code).

What is here, by purpose:
- registration: `hookimpl` (hooks in `gdsllm_core.hookspecs`);
- errors: `GdsllmError` and its subclasses;
- conversion: `Converter`, `ConvertOptions`, `ModelWriter`, `ExtentRole`, `write_extents`, `read_json`, the GGUF
  and safetensors readers (`read_gguf`, `gguf_architecture`, `SafetensorsFolder`, `tensor_entry`), the HF tokenizer
  reader, GGML block tables and (de)quantizers;
- the model folder: `Manifest`, `ExtentInfo`, `TensorInfo`, `TokenizerInfo`, `ModelEntry`, `ModelStore`;
- storage: `ExtentReader`, `extent_views`, `drop_page_cache`;
- loading: `LoadOptions`, `ForwardPass`;
- the runtime: `DecoderModel` and the types it meets (`Workspace`, `ExtentWeights`, `CpuStep`, `KvSpec`, the KV
  caches, `RuntimeOptions`), `Residency`, statistics types, MoE expert residency and routing (`ExpertResidency`,
  `routed_experts`, `top_k_routing`, ...), and shared math (`rms_norm`, `rope_tables`,
  `apply_rope`, `attend`, `attend_cached`).
"""

import importlib

_EXPORTS = {
    # registration
    "hookimpl": "gdsllm_core.hookspecs:hookimpl",
    # errors
    "GdsllmError": "gdsllm_core.errors:GdsllmError",
    "BackendUnavailableError": "gdsllm_core.errors:BackendUnavailableError",
    "BadRequestError": "gdsllm_core.errors:BadRequestError",
    "ContextOverflowError": "gdsllm_core.errors:ContextOverflowError",
    "ConversionError": "gdsllm_core.errors:ConversionError",
    "CorruptModelError": "gdsllm_core.errors:CorruptModelError",
    "ModelNotFoundError": "gdsllm_core.errors:ModelNotFoundError",
    "PluginError": "gdsllm_core.errors:PluginError",
    "UnknownArchitectureError": "gdsllm_core.errors:UnknownArchitectureError",
    "UnsupportedQuantError": "gdsllm_core.errors:UnsupportedQuantError",
    "UnsupportedTokenizerError": "gdsllm_core.errors:UnsupportedTokenizerError",
    # conversion
    "Converter": "gdsllm_core.convert:Converter",
    "ConvertOptions": "gdsllm_core.convert:ConvertOptions",
    "read_json": "gdsllm_core.convert:read_json",
    "write_extents": "gdsllm_core.convert:write_extents",
    "SafetensorsFolder": "gdsllm_core.convert.hf_folder:SafetensorsFolder",
    "config_architectures": "gdsllm_core.convert.hf_folder:config_architectures",
    "quant_option": "gdsllm_core.convert.hf_folder:quant_option",
    "tensor_entry": "gdsllm_core.convert.hf_folder:tensor_entry",
    "GGUF_MAGIC": "gdsllm_core.convert.gguf_file:GGUF_MAGIC",
    "model_stem": "gdsllm_core.convert.gguf_file:model_stem",
    "read_gguf": "gdsllm_core.convert.gguf_file:read_gguf",
    "read_header": "gdsllm_core.convert.gguf_file:read_header",
    "gguf_architecture": "gdsllm_core.convert.gguf_file:gguf_architecture",
    "build_tokenizer": "gdsllm_core.convert.gguf_tokenizer:build_tokenizer",
    "config_of": "gdsllm_core.layout.manifest:config_of",
    "read_hf_tokenizer": "gdsllm_core.convert.hf_tokenizer:read_hf_tokenizer",
    "token_ids": "gdsllm_core.convert.hf_tokenizer:token_ids",
    "ModelWriter": "gdsllm_core.layout.writer:ModelWriter",
    "ExtentRole": "gdsllm_core.layout.manifest:ExtentRole",
    "FLOAT_QTYPES": "gdsllm_core.layout.qtypes:FLOAT_QTYPES",
    "PLAIN_DTYPES": "gdsllm_core.layout.qtypes:PLAIN_DTYPES",
    "tensor_nbytes": "gdsllm_core.layout.qtypes:tensor_nbytes",
    "ggml": "gdsllm_core.quant.ggml",
    "QUANTIZABLE": "gdsllm_core.quant.quantize:QUANTIZABLE",
    "block_values": "gdsllm_core.quant.quantize:block_values",
    "check_supported": "gdsllm_core.quant.ggml:check_supported",
    "quantize": "gdsllm_core.quant.quantize:quantize",
    # the model folder
    "Manifest": "gdsllm_core.layout.manifest:Manifest",
    "ExtentInfo": "gdsllm_core.layout.manifest:ExtentInfo",
    "TensorInfo": "gdsllm_core.layout.manifest:TensorInfo",
    "TokenizerInfo": "gdsllm_core.layout.manifest:TokenizerInfo",
    "ModelEntry": "gdsllm_core.layout.store:ModelEntry",
    "ModelStore": "gdsllm_core.layout.store:ModelStore",
    # storage
    "ExtentReader": "gdsllm_core.storage.reader:ExtentReader",
    "extent_views": "gdsllm_core.storage.reader:extent_views",
    "drop_page_cache": "gdsllm_core.storage.backends:drop_page_cache",
    # loading
    "LoadOptions": "gdsllm_core.engine.forward:LoadOptions",
    "ForwardPass": "gdsllm_core.engine.forward:ForwardPass",
    # the runtime
    "DecoderModel": "gdsllm_core.runtime.protocols:DecoderModel",
    "DecoderConfig": "gdsllm_core.runtime.protocols:DecoderConfig",
    "CpuStep": "gdsllm_core.runtime.protocols:CpuStep",
    "Residency": "gdsllm_core.runtime.protocols:Residency",
    "HostOffload": "gdsllm_core.runtime.protocols:HostOffload",
    "Placement": "gdsllm_core.runtime.residency:Placement",
    "get_residency": "gdsllm_core.registry:get_residency",
    "COPY_CHUNK_BYTES": "gdsllm_core.runtime.residency:COPY_CHUNK_BYTES",
    "plan_cpu_layers": "gdsllm_core.runtime.cpu_plan:plan_cpu_layers",
    "simulate_cpu_plan": "gdsllm_core.runtime.cpu_plan:simulate_cpu_plan",
    "spread": "gdsllm_core.runtime.cpu_plan:spread",
    "DecoderForward": "gdsllm_core.runtime.protocols:DecoderForward",
    "RuntimeOptions": "gdsllm_core.runtime.protocols:RuntimeOptions",
    "Workspace": "gdsllm_core.runtime.workspace:Workspace",
    "ExtentWeights": "gdsllm_core.runtime.workspace:ExtentWeights",
    "KvSpec": "gdsllm_core.runtime.kv:KvSpec",
    "CpuKvCache": "gdsllm_core.runtime.kv:CpuKvCache",
    "GpuKvCache": "gdsllm_core.runtime.kv:GpuKvCache",
    "RuntimeStats": "gdsllm_core.runtime.stats:RuntimeStats",
    "ResidencyStats": "gdsllm_core.runtime.stats:ResidencyStats",
    "StepStats": "gdsllm_core.runtime.stats:StepStats",
    "ExpertStats": "gdsllm_core.runtime.experts:ExpertStats",
    "TierBytes": "gdsllm_core.runtime.stats:TierBytes",
    # MoE experts
    "ExpertResidency": "gdsllm_core.runtime.experts:ExpertResidency",
    "DENSE_TOKENS": "gdsllm_core.runtime.experts:DENSE_TOKENS",
    "routed_experts": "gdsllm_core.runtime.experts:routed_experts",
    "top_k_routing": "gdsllm_core.runtime.experts:top_k_routing",
    "routing_table": "gdsllm_core.runtime.experts:routing_table",
    "prediction_scores": "gdsllm_core.runtime.experts:prediction_scores",
    "predicted": "gdsllm_core.runtime.experts:predicted",
    "rms_norm": "gdsllm_core.runtime.blocks:rms_norm",
    "rope_tables": "gdsllm_core.runtime.blocks:rope_tables",
    "apply_rope": "gdsllm_core.runtime.blocks:apply_rope",
    "attend": "gdsllm_core.runtime.blocks:attend",
    "attend_cached": "gdsllm_core.runtime.blocks:attend_cached",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"gdsllm_core.api has no {name!r}: plugins may use only {', '.join(__all__)}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
