"""`pydiff serve`: an HTTP server for model packages (the `[serve]` extra: Starlette, uvicorn,
prometheus_client). `create_app` builds the ASGI app, `serve` runs it on uvicorn, `Engine` queues
and runs the work. docs/serving.md describes the endpoints."""

from __future__ import annotations

from pydiff.serving.api import ApiError, Limits
from pydiff.serving.app import ServerState, create_app, load_pipeline
from pydiff.serving.engine import POLICIES, Engine, Job, Result, Work
from pydiff.serving.server import BackgroundServer, DrainingServer, make_server, serve

__all__ = [
    "create_app",
    "load_pipeline",
    "serve",
    "make_server",
    "DrainingServer",
    "BackgroundServer",
    "ServerState",
    "Engine",
    "Work",
    "Job",
    "Result",
    "POLICIES",
    "Limits",
    "ApiError",
]
