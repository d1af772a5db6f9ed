"""OpenAI's API: POST /v1/chat/completions, /v1/completions, /v1/embeddings, GET /v1/models and
/v1/models/{model_id}; also TGI's POST /chat_tokenize (chat's template and tokenizer).

Follows the OpenAI-compatible API of `specs/llamacpp-openapi.json` and the /v1
routes of `specs/tgi-openapi.json`. `install` (common.py) returns these routes,
registers their /invocations shapes and OpenAPI operations (openapi.py), and
mounts llama-cpp-python's /extras family too. common.py: what the routes share
(errors, fields, sampling, `n` choices, SSE, the model list); chat.py with
tools.py (tool calling); completions.py; embeddings.py.
"""

from ember.router.api.openai.common import install

__all__ = ["install"]
