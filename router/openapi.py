"""The OpenAPI document for Ember's routes (served at /openapi.json, shown at /docs).

Each API family (router/api/) registers its operations and schemas with
`register`; `document()` lists those whose path the running app serves, so
the document never advertises a route that is missing.
"""

from __future__ import annotations

from ember import __version__

SCHEMAS: dict[str, dict] = {}
OPERATIONS: dict[str, dict[str, dict]] = {}


def ref(name: str) -> dict:
    """A reference to a schema of the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: list[str], **props: dict) -> dict:
    """An object schema with these properties, the `required` ones listed."""
    return {"type": "object", "required": required, "properties": props}


def register(path: str, method: str, operation: dict, schemas: dict[str, dict] | None = None) -> None:
    """Add an operation (and its schemas) to the document."""
    OPERATIONS.setdefault(path, {})[method.lower()] = operation
    SCHEMAS.update(schemas or {})


def document(routes: list) -> dict:
    served = {getattr(r, "path", None) for r in routes}
    paths = {p: ops for p, ops in OPERATIONS.items() if p in served}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Ember",
            "description": "Text generation inference server (TGI-compatible)",
            "license": {"name": "Apache 2.0"},
            "version": __version__,
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


SWAGGER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Ember API</title>
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
