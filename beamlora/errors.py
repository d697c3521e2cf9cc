"""beamlora's errors: part of rankscope's one hierarchy, printed as ``Error: ...`` by the CLIs."""

from rankscope.errors import RankscopeError


class BeamLoraError(RankscopeError):
    """Bad input or an impossible request in training. The message says what was found and what was expected."""
