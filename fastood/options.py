"""Trainer options from the command line: ``--set KEY=VALUE`` (``fastood train``, ``bench/compare_methods.py``).
Imports nothing heavy, so the CLI parser can use it."""

import ast

__all__ = ["parse_trainer_option"]


def parse_trainer_option(text: str) -> tuple:
    """``"KEY=VALUE"`` -> ``(KEY, value)``: a trainer keyword argument from the command line (``--set``). VALUE is
    read as a Python literal where it is one (``True``, ``0.01``, ``(2, 1, 1)``, ``None``), else kept as a string
    (``auto``, ``authors``)."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"a trainer option must be KEY=VALUE with KEY a keyword argument name, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key, value
