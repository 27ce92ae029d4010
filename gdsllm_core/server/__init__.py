"""The HTTP server: ollama and OpenAI routes over one engine (see `app.create_app`, `app.run_server`)."""

from gdsllm_core.server.app import create_app, run_server

__all__ = ["create_app", "run_server"]
