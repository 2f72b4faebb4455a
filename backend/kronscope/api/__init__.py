"""The JSON API under ``/api/v1``.

Each module of ``kronscope.api.routes`` exposes ``router`` (an ``APIRouter`` using
``APIRouteChecked``); ``api_router()`` includes them all, so adding a resource never
touches another one's module.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastapi import APIRouter

from . import routes

PREFIX = "/api/v1"
HOT_ROUTES = ("latents", "parents", "heads")


def api_router() -> APIRouter:
    root = APIRouter(prefix=PREFIX)
    # The feature pages a dashboard serves most are matched first.
    first = {name: rank for rank, name in enumerate(HOT_ROUTES)}
    modules = sorted(
        pkgutil.iter_modules(routes.__path__), key=lambda m: (first.get(m.name, len(first)), m.name)
    )
    for info in modules:
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{routes.__name__}.{info.name}")
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            root.include_router(router)
    return root
