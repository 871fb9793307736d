"""The adapted tests' fixture (`make_engine`: kvtier_contract.py's engine, closed at teardown)."""

from kvtier_contract import make_engine  # noqa: F401
