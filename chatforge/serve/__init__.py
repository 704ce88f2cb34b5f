"""The server: an OpenAI-compatible API and a web UI on engine replicas (see serve/app.py)."""
