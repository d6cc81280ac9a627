"""One error type for everything a user can fix: the CLIs print it as one line, no traceback."""


class GptforgeError(Exception):
    """A problem with the user's input (config, data, checkpoint, flags) that says what, where and how to fix."""


class ConfigError(GptforgeError):
    """An invalid config file or override."""


class DataError(GptforgeError):
    """Missing, corrupt or mismatched data (manifest, shards, input files)."""


class CheckpointError(GptforgeError):
    """A missing, corrupt or incompatible checkpoint."""
