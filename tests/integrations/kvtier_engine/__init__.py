"""Tests of the bundled engine (kvtier_engine), laid out like the package: core modules at the top,
then layers/, models/ and serving/.

A package (`integrations.kvtier_engine`), so that its conftest does not shadow tests/conftest.py.
"""
