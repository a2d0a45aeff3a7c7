"""`python -m lifecycle` (and so `accelerate launch -m lifecycle ...`) runs the CLI."""

from lifecycle.cli import main

main()
