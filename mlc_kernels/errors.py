"""User errors of the ``mlc`` command: one line on stderr and exit status 2, no traceback (``--debug`` or
``MLC_DEBUG=1`` shows it)."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the command's inputs (options, files, model, data) that the user can fix: the message
    says what is wrong, where (the option or the file and line), and what to do."""

    exit_status = 2
