"""Compressors: message formats, their exact sizes on the wire, encode/decode (TopK, QSGD, Sign, FP16, None)."""

from kimad.compressors.wire import MessageFormat, message_bytes

__all__ = ["MessageFormat", "message_bytes"]
