"""The one exception type users see: a one-line message, printed as ``Error: ...`` by the CLIs."""


class RankscopeError(Exception):
    """Bad input or an impossible request. The message says what was found and what was expected."""
