"""`python -m gdsllm_core` is the `gdsllm` command."""

from gdsllm_core.cli.main import main

main()
