"""`python -m kvtier_engine serve MODEL ...`: the same as the `kvtier_engine` command."""

from kvtier_engine.cli import main

main()
