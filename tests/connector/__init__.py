"""Tests of kvtier's KV connector (kvtier/connector), alone and plugged into the bundled engine.

A package, so that its conftest does not shadow tests/conftest.py.
"""
