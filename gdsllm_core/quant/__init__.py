"""GGML block formats: dequantization to float32 (the CPU reference the GPU kernels are tested against) and
quantization at conversion time."""

from gdsllm_core.quant.ggml import SUPPORTED_TYPES, dequantize

__all__ = ["SUPPORTED_TYPES", "dequantize"]
