"""User-facing errors. Each says what failed, the value, and how to fix it."""


class TelepathyError(ValueError):
    """Base of every error a user is meant to read and act on."""


class ConfigError(TelepathyError):
    """A configuration key, type or value is wrong."""


class DataError(TelepathyError):
    """The training data is missing or does not fit the configuration."""


class CheckpointError(TelepathyError):
    """A checkpoint is corrupt, incomplete or cannot be used."""


class ResumeRefused(TelepathyError):
    """Resuming would silently change the training trajectory."""


class RunLocked(TelepathyError):
    """Another live job already owns this run directory."""
