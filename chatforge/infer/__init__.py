"""Inference: the KV-cache engine, sampling, and the Python sandbox for tool calls."""
