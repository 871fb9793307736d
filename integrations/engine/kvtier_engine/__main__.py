"""`python -m kvtier_engine serve MODEL ...`: the same as the `kvtier_engine` command."""

from kvtier_engine.serving.cli import main

main()
