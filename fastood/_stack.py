"""Pointing a warning at the user's line: the stack level of the first frame outside the fastood package."""
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` called right here by the caller of this function, so that the
    warning names the first frame outside fastood (the user's ``fit(...)`` or ``objective(...)`` line) however
    deep inside fastood the warning is raised (Python 3.12's ``skip_file_prefixes`` does the same)."""
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
