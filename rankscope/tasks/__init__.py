"""What is trained and evaluated: base models, data sets, the held-out split, evaluation.

Shared by ``rankscope sweep`` / ``resize --validate`` and by beamlora's training (see docs/architecture.md).
"""
