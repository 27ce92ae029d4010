"""Imports every built-in command module so each registers itself on the `cli` group."""

from gdsllm_core.cli import chat  # noqa: F401, I001  (one line per command module)
from gdsllm_core.cli import bench_cmd  # noqa: F401,E402
from gdsllm_core.cli import doctor_cmd  # noqa: F401,E402
from gdsllm_core.cli import models  # noqa: F401
from gdsllm_core.cli import plugins_cmd  # noqa: F401
from gdsllm_core.cli import serve  # noqa: F401
