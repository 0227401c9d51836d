"""The HTTP API (FastAPI): job submission and tracking for tenants with bearer API keys.

Importing this package loads neither torch nor the training engine; `create_app` imports only the
engine's pure-pydantic job spec, so the API process stays light.
"""
