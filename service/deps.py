"""Typed dependencies (`Annotated` aliases) that read what the lifespan put on `app.state`.

Routers declare what they need (`store: StoreDep`) and never touch `app.state` themselves, so a
handler's signature says which parts of the service it uses.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.pipeline import ScoringPipeline
from service.settings import Settings
from service.store import HistoryStore
from service.strategies import Reranker

__all__ = ["BatcherDep", "BundleDep", "MetricsDep", "PipelineDep", "RerankerDep", "SettingsDep", "StoreDep"]


def _state(name: str) -> Any:
    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
BundleDep = Annotated[Any, Depends(_state("bundle"))]  # rellax.bundle.Bundle (imported lazily)
StoreDep = Annotated[HistoryStore, Depends(_state("store"))]
BatcherDep = Annotated[MicroBatcher, Depends(_state("batcher"))]
PipelineDep = Annotated[ScoringPipeline, Depends(_state("pipeline"))]
RerankerDep = Annotated[Reranker, Depends(_state("reranker"))]
