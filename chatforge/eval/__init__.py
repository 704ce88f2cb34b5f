"""Evaluation: bits per byte, CORE, and the chat task suite."""
