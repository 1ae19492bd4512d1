"""Errors the pipeline raises on purpose. The CLI turns each into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class ConfigError(PipelineError):
    """A configuration value or option is invalid."""


class DatasetError(PipelineError):
    """The dataset is missing, malformed, or does not fit the teacher or student."""


class TeacherError(PipelineError):
    """The teacher model cannot be loaded or run, or produced unusable outputs."""


class CacheError(PipelineError):
    """A cache is missing, incomplete, corrupted, or does not match what was asked."""


class StorageError(PipelineError):
    """An object store (s3:// ...) cannot be reached or refuses a request: a bad URI, bucket or credentials."""


class DistributedError(PipelineError):
    """A torchrun rank (or a launcher-free worker) failed, vanished or timed out, or the launch is inconsistent."""


class TrainingError(PipelineError):
    """Training went wrong in a way the user can fix (a loss that is no longer a number)."""
