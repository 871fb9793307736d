"""Tests of kvtier_engine/layers/: paged attention, torch and Triton."""
