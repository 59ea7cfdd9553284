"""The OpenAI-compatible HTTP gateway: `python -m services.gateway` (see `app.py` for the map).

Files: `app` (wiring, middlewares, serve), `routes` (models, health, status, metrics, tokenize),
`chat` / `completions` (generation endpoints), `generation` (one request's life on the bus),
`openai_schema` + `json_fields` (request validation, API errors), `client` (the bus side),
`context` (shared state, model limits, admission), `logprobs`, `metrics`, `httpio` (SSE, JSON).
"""
