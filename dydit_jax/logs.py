"""Console logging for the entry points: our INFO lines, libraries' warnings only."""

from __future__ import annotations

import logging as py_logging

from absl import logging

_NOISY = ("orbax", "etils", "tensorstore")
# Warnings that say nothing actionable to our users, by the start of their message.
_KNOWN_NOISE = (
    "Type handler registry type",  # Orbax at import: its handler for jax.Array re-registered
)


class _KnownNoiseFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KNOWN_NOISE)


def drop_known_noise() -> None:
    """Drop the `_KNOWN_NOISE` records from absl's logger (where Orbax logs them)."""
    logger = py_logging.getLogger("absl")
    if not any(isinstance(f, _KnownNoiseFilter) for f in logger.filters):
        logger.addFilter(_KnownNoiseFilter())


class _LibraryFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.WARNING:
            return True
        return not any(name in record.pathname for name in _NOISY)


def configure() -> None:
    """INFO for this project; Orbax and friends only at WARNING and above."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_LibraryFilter())
