"""`python -m domaintune` runs the CLI (same as the `domaintune` command)."""

from domaintune.cli import main

main()
