"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Base for mistakes in input (paths, files, names, values), as opposed to bugs."""


class RecipeError(UserError, ValueError):
    """A recipe file or override that cannot be read or does not fit the recipe schema."""


class BadSampleError(UserError, ValueError):
    """A data sample (image, video, volume) that cannot be read; the message names the file."""


class DataError(UserError, ValueError):
    """A dataset root with the wrong layout or no usable samples."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ParityError(UserError, RuntimeError):
    """An exported model does not compute what the torch model computes on the given inputs."""
