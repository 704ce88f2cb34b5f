"""Failures a user caused, each carrying a one-line fix.

The CLI catches ChatforgeError, prints its message on one line and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class ChatforgeError(Exception):
    """Something the user can fix: a flag, a file, a request field. The message says what to do."""

    exit_code = 2


class UsageError(ChatforgeError):
    """A flag or argument that is out of range or inconsistent with another one."""


class DataError(ChatforgeError):
    """An input file (shard, corpus, conversation, task file) that is missing, empty or corrupt."""


class DownloadError(ChatforgeError):
    """A download that failed after its retries, or whose file failed verification."""


class CheckpointError(ChatforgeError):
    """A checkpoint that is missing, incomplete, or from another model shape."""


class TrainingDiverged(ChatforgeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Interrupted(ChatforgeError):
    """Ctrl-C during training: the run stopped after its current step; the message says what was kept."""

    exit_code = 130
