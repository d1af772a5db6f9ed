"""The HTTP API families, one package each: adapters over the router's core.

Each family reads its own bodies into the one internal request
(`ember.router.types.GenerateRequest`), runs it through `Infer`, and writes the
result in its own shape. Families import the core (router/*.py); the core never
imports a family, except where the app is assembled: `app.py` mounts TGI's
routes, `cli.py` calls the OpenAI family's `install`, which also mounts /extras.

- `tgi/`: TGI's native routes (`specs/tgi-openapi.json`)
- `openai/`: OpenAI's /v1 routes and TGI's /chat_tokenize
- `extras/`: llama-cpp-python's /extras routes (`specs/llamacpp-openapi.json`)

(`specs/` is in the steering repo, beside DESIGN.md.)
"""
