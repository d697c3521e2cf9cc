"""The one error hierarchy of both packages: a one-line message, printed as ``Error: ...`` by the CLIs.

beamlora's :class:`beamlora.errors.BeamLoraError` is a subclass.
"""


class RankscopeError(Exception):
    """Bad input or an impossible request. The message says what was found and what was expected."""
