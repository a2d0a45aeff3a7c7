"""The one exception type for user mistakes.

Raise `UsageError` with what was found, what was expected and how to fix it.
Only `lifecycle.cli` catches it: it prints `error: <message>` on one line and
exits with status 2. Internal invariants use `assert`, never this.
"""


class UsageError(Exception):
    """A problem with the user's input (flags, config, data, paths)."""

    def __init__(self, message: str):
        # Keep the message on one line: the CLI prints it as `error: ...`.
        super().__init__(" ".join(str(message).split()))


class Interrupted(Exception):
    """Raised inside a training loop after Ctrl-C/SIGTERM once a checkpoint is saved."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm: the run stops, keeping its last good checkpoint (exit 3)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class StageRegressed(Exception):
    """`llm run` stopped after a stage scored worse than its parent by more than the set margin (exit 4)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
