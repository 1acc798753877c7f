"""One exception family. Messages name the input (file, key, parameter), show the value and say what is valid."""


class NimbleDiffError(Exception):
    """Base class of every error NimbleDiff raises on purpose."""


class InvalidParameterError(NimbleDiffError, ValueError):
    """A user-supplied argument is out of range or of the wrong kind."""


class WeightsFormatError(NimbleDiffError, ValueError):
    """A weights file cannot be read, or its layout is not recognised."""


class AdapterMismatchError(NimbleDiffError, ValueError):
    """An adapter does not fit the model it is applied to (keys, shapes or architecture)."""


class SamplingError(NimbleDiffError, RuntimeError):
    """Sampling cannot continue (for example the model returned NaN)."""
