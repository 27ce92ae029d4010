"""Every path the server answers, as constants (the controllers and the tests share them)."""

HEALTH = "/health"
SCHEMA = "/schema"

OLLAMA_GENERATE = "/api/generate"
OLLAMA_CHAT = "/api/chat"
OLLAMA_TAGS = "/api/tags"
OLLAMA_SHOW = "/api/show"
OLLAMA_PS = "/api/ps"
OLLAMA_VERSION = "/api/version"
OLLAMA_DELETE = "/api/delete"

OPENAI_PREFIX = "/v1"
OPENAI_CHAT = "/v1/chat/completions"
OPENAI_COMPLETIONS = "/v1/completions"
OPENAI_MODELS = "/v1/models"
OPENAI_MODEL = "/v1/models/{model_id:str}"
