"""Tests of the bundled engine (kvtier_engine).

A package, so that its conftest does not shadow tests/conftest.py.
"""
