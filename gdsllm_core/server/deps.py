"""What the route handlers get injected, from `app.state` (filled by the lifespan): the engine, the model store and
the model that requests naming none get."""

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from gdsllm_core.layout.store import ModelStore
from gdsllm_core.server.streams import Engine

EngineDep = NamedDependency[Engine]
StoreDep = NamedDependency[ModelStore]
DefaultModelDep = NamedDependency[str | None]


def provide_engine(state: State) -> Engine:
    return state.engine


def provide_store(state: State) -> ModelStore:
    return state.store


def provide_default_model(state: State) -> str | None:
    return state.default_model


DEPENDENCIES = {"engine": Provide(provide_engine, sync_to_thread=False),
                "store": Provide(provide_store, sync_to_thread=False),
                "default_model": Provide(provide_default_model, sync_to_thread=False)}
