"""Errors a user can cause: each names the thing that is wrong and how to fix it."""


class GdsllmError(Exception):
    """Base of every user-facing error; `hint` says how to fix it."""

    http_status = 400

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelNotFoundError(GdsllmError):
    http_status = 404


class UnknownArchitectureError(GdsllmError):
    pass


class UnsupportedQuantError(GdsllmError):
    pass


class ConversionError(GdsllmError):
    pass


class UnsupportedTokenizerError(ConversionError):
    """A checkpoint's tokenizer (type or pre-tokenizer) that gdsllm cannot rebuild faithfully."""


class CorruptModelError(GdsllmError):
    """A weight file is truncated, or its bytes do not match the manifest's checksum."""

    http_status = 500


class StorageReadError(GdsllmError):
    """Reading a model's weights failed (an I/O error or a short read): the generation that needed them ends."""

    http_status = 500


class ContextOverflowError(GdsllmError):
    pass


class BadRequestError(GdsllmError):
    pass


class InvalidFieldError(BadRequestError):
    """A request field has a value gdsllm cannot honour; `param` names the field (OpenAI reports it)."""

    def __init__(self, param: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.param = param


class BackendUnavailableError(GdsllmError):
    """A storage or compute backend that was asked for cannot run here."""

    http_status = 500


class PluginError(GdsllmError):
    pass


class DownloadError(GdsllmError):
    """Fetching a checkpoint from a Hugging Face hub failed (network, token, missing file, disk)."""

    http_status = 502
