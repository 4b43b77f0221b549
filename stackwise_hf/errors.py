"""Exceptions raised on bad input. Each message names the file, tensor, field or value at fault."""


class StackWiseError(Exception):
    """Base class of the library's own errors."""


class CorruptFileError(StackWiseError, ValueError):
    """A file exists but cannot be read as what it claims to be (truncated, bad header, hash mismatch)."""


class ShapeMismatchError(StackWiseError, ValueError):
    """Saved weights do not fit the rack (tensor shapes, block count, missing or extra tensors)."""


class CheckpointError(StackWiseError, OSError):
    """A training checkpoint is incomplete, damaged, or does not belong to this run."""


class NonFiniteError(StackWiseError, FloatingPointError):
    """Training produced a non-finite loss, gradient or weight; it stops before anything non-finite is saved."""


class UnsupportedFormatError(CorruptFileError):
    """A file declares a format version or model type this library does not read (it names both)."""


class UnsafePathError(StackWiseError, ValueError):
    """A path read from a file leads outside its folder (absolute, `..`, a symlink out) or is not a plain name."""


class MissingFileError(StackWiseError, FileNotFoundError):
    """A file the rack (or its index or a manifest) needs is not there; the message names it."""
