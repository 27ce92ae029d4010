"""The GDSLLM_* knobs: each read from the environment (and `.env` files) when asked, never cached."""

import os
import warnings
from pathlib import Path

import platformdirs
from dotenv import load_dotenv

APP_NAME = "gdsllm"


def load_env_files() -> None:
    """Read `.env` in the working directory and in the config directory; the environment always wins."""
    for candidate in (Path.cwd() / ".env", config_dir() / ".env"):
        if candidate.is_file():
            load_dotenv(candidate, override=False)


def config_dir() -> Path:
    return Path(os.environ.get("GDSLLM_CONFIG_DIR") or platformdirs.user_config_dir(APP_NAME))


def model_root() -> Path:
    """Where converted models live (GDSLLM_MODEL_ROOT, default: the user's data dir)."""
    return Path(os.environ.get("GDSLLM_MODEL_ROOT") or Path(platformdirs.user_data_dir(APP_NAME)) / "models")


def hf_cache() -> Path:
    """Where `pull` keeps downloads (GDSLLM_HF_CACHE, default: the user's cache dir)."""
    return Path(os.environ.get("GDSLLM_HF_CACHE") or Path(platformdirs.user_cache_dir(APP_NAME)) / "hf")


def runtime_dir() -> Path:
    """Where the server's pid file lives (GDSLLM_RUNTIME_DIR, default: the user's runtime dir)."""
    if os.environ.get("GDSLLM_RUNTIME_DIR"):
        return Path(os.environ["GDSLLM_RUNTIME_DIR"])
    with warnings.catch_warnings():  # without XDG_RUNTIME_DIR platformdirs warns and falls back to /tmp/runtime-UID
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP_NAME))


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_HUB_TOKEN") or None


def api_token() -> str | None:
    """Bearer token the server requires (GDSLLM_API_TOKEN); None means open access."""
    return os.environ.get("GDSLLM_API_TOKEN") or None


def io_backend() -> str:
    """GDSLLM_IO: auto | cufile | posix | cpu."""
    value = os.environ.get("GDSLLM_IO", "auto").strip().lower()
    return value or "auto"


def device() -> str:
    """GDSLLM_DEVICE: auto | cuda | cpu."""
    return os.environ.get("GDSLLM_DEVICE", "auto").strip().lower() or "auto"


def load_plugins() -> list[str] | None:
    """GDSLLM_LOAD_PLUGINS: a comma-separated list of entry-point names to load; empty loads none; unset loads all."""
    value = os.environ.get("GDSLLM_LOAD_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def default_num_ctx() -> int:
    """GDSLLM_NUM_CTX: the context window of a request that sets no num_ctx (capped by the model's maximum)."""
    return int(os.environ.get("GDSLLM_NUM_CTX") or 4096)


def prefix_cache_bytes() -> int:
    """GDSLLM_PREFIX_CACHE: bytes of finished sequences' caches kept for reuse by later prompts (a size such as
    "1GiB"; 0 turns the prefix cache off)."""
    from gdsllm_core.cli.output import parse_size

    return parse_size(os.environ.get("GDSLLM_PREFIX_CACHE") or "1GiB")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")  # the names a local browser page is served from
DEFAULT_ORIGIN_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")  # desktop apps, as ollama's


def origins() -> list[str]:
    """Browser origins the server answers (GDSLLM_ORIGINS, comma-separated, `*` a wildcard, as OLLAMA_ORIGINS):
    always the loopback origins on any port and desktop-app schemes, plus those listed."""
    listed = [origin.strip() for origin in os.environ.get("GDSLLM_ORIGINS", "").split(",") if origin.strip()]
    loopback = [f"{scheme}://{host}{port}" for host in LOOPBACK_HOSTS for scheme in ("http", "https")
                for port in ("", ":*")]
    return listed + loopback + [f"{scheme}://*" for scheme in DEFAULT_ORIGIN_SCHEMES]
