"""Errors a user can cause. Stage scripts print their message (one line) and exit non-zero."""


class AnodiffError(Exception):
    """Base class: the message names the file or params key and what is wrong."""


class ConfigError(AnodiffError):
    """A params.yaml key is unknown, of the wrong type or out of range."""


class DataError(AnodiffError):
    """Input data (folders, images, masks) is missing or malformed."""


class BadImageError(DataError):
    """One image file cannot be read."""

    def __init__(self, path, reason):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(AnodiffError):
    """A checkpoint is missing, corrupt or built for another configuration."""


class TrainingDiverged(AnodiffError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""
