"""The one exception type users see from beamlora; the CLI prints it as ``Error: ...``."""


class BeamLoraError(Exception):
    """Bad input or an impossible request. The message says what was found and what was expected."""
