"""llama-cpp-python's /extras routes: POST /extras/tokenize, /extras/tokenize/count and /extras/detokenize.

Follows `specs/llamacpp-openapi.json`. `routes.py` holds the routes (`ROUTES`),
`openapi.py` their operations; the OpenAI family's `install` mounts both, as
llama-cpp-python serves these beside its OpenAI API.
"""
