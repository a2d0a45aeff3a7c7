"""`python -m lifecycle` (and so `accelerate launch -m lifecycle ...`) runs the CLI."""

from lifecycle.launch import maybe_spawn_cpu_ranks

maybe_spawn_cpu_ranks()

from lifecycle.cli import main  # noqa: E402

main()
