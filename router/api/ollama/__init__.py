"""Ollama's API on the model registry: /api/generate, /api/chat, /api/embed, /api/embeddings
(`generate.py`), and the library routes /api/tags, /api/show, /api/ps, /api/pull, /api/push,
/api/create, /api/copy, /api/delete, /api/blobs/{digest}, /api/version, GET/HEAD /
(`library.py`).

Follows `specs/ollama-openapi.yaml`, and Ollama's documented behaviour where the spec is silent.
`common.py` holds what the routes share: Ollama's error body and statuses, NDJSON streams, timestamps
and durations, and resolving a request's model with its `keep_alive`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from ember.router.app import AppState


def install(state: AppState) -> list[BaseRoute]:
    """Ollama's routes; the caller mounts them before TGI's (GET / answers as Ollama does)."""
    from ember.router.api.ollama import generate, library

    return [*library.routes(state), *generate.routes(state)]
