"""The one exception type users see: a message that says what is wrong and where."""


class SlimtuneError(ValueError):
    """Bad input or state, explained: which file, line, key or value, and what was expected."""
