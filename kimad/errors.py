"""Errors Kimad raises. Every one is a :class:`KimadError`, and says what to do about it."""


class KimadError(Exception):
    """Base class of every error Kimad raises on purpose."""


class ExtensionNotBuiltError(KimadError, ImportError):
    """The native extension ``kimad._C`` is missing or does not load."""


class CorruptMessageError(KimadError, ValueError):
    """A received compression message is malformed (e.g. an index outside its tensor)."""


class NonFiniteGradientError(KimadError, ValueError):
    """A gradient (plus its error-feedback state) holds NaN or Inf; nothing was compressed or updated."""


class StaleProfileError(KimadError, ValueError):
    """A top-k profile handed to an encode does not describe its tensors as they are now."""
