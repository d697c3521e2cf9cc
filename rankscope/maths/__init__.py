"""Pure maths on arrays and documents: importances, spectra, summaries, verdicts, dynamics, statistics.

Above :mod:`rankscope.io`; never imports torch at module level (see docs/architecture.md).
"""
