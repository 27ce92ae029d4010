"""gdsllm: LLM inference that streams weights from NVMe into GPU memory, served through Ollama and OpenAI APIs."""

from gdsllm_core.errors import GdsllmError
from gdsllm_core.hookspecs import hookimpl
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent

__version__ = "0.1.0"
__all__ = ["ChatMessage", "GdsllmError", "GenerateRequest", "SamplingParams", "TokenEvent", "__version__", "hookimpl"]
