"""Console logging for the entry points: our INFO lines, libraries' warnings only."""

from __future__ import annotations

import logging as py_logging

from absl import logging

_NOISY = ("orbax", "etils", "tensorstore")


class _LibraryFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.WARNING:
            return True
        return not any(name in record.pathname for name in _NOISY)


def configure() -> None:
    """INFO for this project; Orbax and friends only at WARNING and above."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_LibraryFilter())
