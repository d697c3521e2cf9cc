"""``python -m beamlora`` (and ``torchrun -m beamlora train ...``): the ``beamlora`` command."""

from beamlora.cli import main

if __name__ == "__main__":
    main()
