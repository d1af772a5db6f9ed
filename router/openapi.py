"""The OpenAPI document for Ember's routes (served at /openapi.json, shown at /docs).

Each API family (router/api/) registers its operations and schemas with
`register`; `document()` lists those whose path the running app serves, so
the document never advertises a route that is missing, and describes every
other route it serves (Ollama's, Jan's) from its handler's docstring.
"""

from __future__ import annotations

import re

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
    paths = {
        p: {m: _with_path_parameters(p, op) for m, op in ops.items()} for p, ops in OPERATIONS.items() if p in served
    }
    for route in routes:
        path = getattr(route, "path", None)
        if path is None or path in OPERATIONS:
            continue
        ops = paths.setdefault(_template(path), {})
        for method in sorted((getattr(route, "methods", None) or set()) - {"HEAD"}):
            ops.setdefault(method.lower(), _described(route, path))
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


def _template(path: str) -> str:
    """Starlette's path template in OpenAPI's spelling: `{name:path}` is `{name}`."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def _with_path_parameters(path: str, operation: dict) -> dict:
    """The operation with each `{name}` of its path declared as a path parameter (OpenAPI requires it)."""
    names = re.findall(r"\{(\w+)(?::\w+)?\}", path)
    declared = {p.get("name") for p in operation.get("parameters", []) if p.get("in") == "path"}
    missing = [n for n in names if n not in declared]
    if not missing:
        return operation
    extra = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in missing]
    return {**operation, "parameters": [*operation.get("parameters", []), *extra]}


def _described(route, path: str) -> dict:
    """A route no family registered a full operation for (Ollama's, Jan's): what its handler's docstring and
    module say, and its path parameters."""
    endpoint = getattr(route, "endpoint", None)
    doc = (getattr(endpoint, "__doc__", None) or "").strip()
    module = getattr(endpoint, "__module__", "") or ""
    family = module.split(".")[3] if module.startswith("ember.router.api.") else "service"
    operation: dict = {
        "tags": [_FAMILIES.get(family, family)],
        "summary": doc.splitlines()[0] if doc else path,
        "responses": {"200": {"description": "OK"}, "4XX": {"description": "An error, with its message"}},
    }
    return _with_path_parameters(path, operation)


_FAMILIES = {
    "ollama": "Ollama",
    "jan": "Jan",
    "openai": "OpenAI",
    "tgi": "Text Generation Inference",
    "extras": "llama-cpp-python",
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
