"""The two kinds of failure nnlab reports: a user's input error (exit 2) and a runtime failure (exit 1)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (config, data files, checkpoint, request). The CLI prints the message
    and exits with code 2; the message names the problem and the fix."""


class Diverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
