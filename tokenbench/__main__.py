"""``python -m tokenbench``: the command line (and ``torchrun -m tokenbench``)."""

from .cli.main import main

if __name__ == "__main__":
    main()
