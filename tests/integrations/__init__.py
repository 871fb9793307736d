"""Tests of what lives under integrations/ (today the bundled engine, kvtier_engine).

Why `tests/integrations/kvtier_engine/` and not `tests/kvtier_engine/`: pytest's default "prepend"
import mode names a test module after its topmost package, with tests/ on sys.path. A package
`tests/kvtier_engine/` would therefore be imported as `kvtier_engine` and shadow the engine itself,
and a plain folder's conftest.py would be imported as `conftest` and shadow tests/conftest.py, which
other tests import by that name. One package level above avoids both.
"""
