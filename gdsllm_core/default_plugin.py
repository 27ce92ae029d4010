"""The core's own registrations: the default residency scheduler."""

from gdsllm_core.hookspecs import hookimpl


@hookimpl
def register_schedulers(register):
    register("tiered", "gdsllm_core.scheduler:TieredScheduler")
