"""User-facing error hierarchy.

Every error caused by user input (a config, data, a checkpoint) is a :class:`PolytaskError`
whose message names the offending key, task, tensor or file in one line. The CLI prints it
without a traceback and exits with status 2. Programming errors keep ordinary exceptions.
"""


class PolytaskError(Exception):
    """Base class of every user error raised by polytask."""


class ConfigError(PolytaskError, ValueError):
    """A configuration key, value, method name or parameter is wrong."""


class DataError(PolytaskError, ValueError):
    """Input data do not fit the declared tasks (missing targets, wrong shapes, bad files)."""


class CheckpointError(PolytaskError):
    """A checkpoint is missing, corrupt or does not match the model."""


class TrainingError(PolytaskError):
    """Training cannot go on (e.g. a task loss became NaN or infinite)."""


class MergeError(PolytaskError):
    """Checkpoints cannot be merged (missing tensors, shape or dtype mismatch, bad base)."""


def error_from_name(kind: str, message: str) -> PolytaskError:
    """The user error of class name ``kind`` (``PolytaskError`` or a subclass) with ``message``: how a
    rank or a worker process passes its error to another process, which raises it as its own
    (``PolytaskError`` itself when the name is unknown or its class takes other arguments)."""
    todo: list[type[PolytaskError]] = [PolytaskError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == kind:
            try:
                return cls(message)
            except TypeError:
                break
        todo.extend(cls.__subclasses__())
    return PolytaskError(message)
