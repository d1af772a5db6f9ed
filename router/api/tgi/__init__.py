"""TGI's native API: POST /generate, /generate_stream, / (compat) and /invocations.

Follows `specs/tgi-openapi.json`. `routes.py` holds the routes (`ROUTES`,
mounted by `app.create_app`); `openapi.py` TGI's schemas and operations, added
to the document when this package is imported. Those include the service
routes that app.py serves itself (/info, /health, /ping, /metrics, /tokenize).
TGI's /v1 routes and /chat_tokenize are served by the OpenAI family.
"""

from ember.router.api.tgi import openapi as _openapi
from ember.router.api.tgi.routes import ROUTES

_openapi.register_all()

__all__ = ["ROUTES"]
