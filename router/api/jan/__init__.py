"""Jan's model API on the model registry: GET/POST /v1/models, GET/DELETE /v1/models/{id},
PUT /v1/models/{id}/start and /stop, GET /v1/models/download/{id}.

Follows `specs/jan-models.yaml` where it is consistent; where its two schemas
disagree (`state`: the list's `Model` says null/downloading/ready/..., `GetModelResponse`
says not_downloaded/downloaded/running/stopped) every route answers with
GetModelResponse's states, plus `downloading` while a download runs. Each entry is
also an OpenAI model object (`id`, `object`, `created`, `owned_by`), so OpenAI
clients listing models read the same list. `routes.py` holds the routes.
"""

from ember.router.api.jan.routes import install

__all__ = ["install"]
