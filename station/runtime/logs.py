"""How the station's log lines look, by hand and under systemd."""

from __future__ import annotations

import logging
import os


class _JournalFormatter(logging.Formatter):
    """Under systemd, stderr goes to the journal: a <N> prefix gives each line its
    syslog priority (journalctl -p warning shows warnings and worse); journald stamps the time."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>" + super().format(record)


def configure_logging(verbose: bool):
    """Log lines to stderr: with a syslog priority under systemd's journal, with time and level by hand."""
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM"):  # set by systemd when stderr is the journal
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
