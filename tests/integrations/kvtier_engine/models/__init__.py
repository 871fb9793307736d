"""Tests of kvtier_engine/models/: the Llama-family decoder, the loader and the presets."""
