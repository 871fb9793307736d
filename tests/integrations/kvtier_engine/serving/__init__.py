"""Tests of kvtier_engine/serving/: the OpenAI-compatible server, its engine loop and CLI."""
