"""`python -m chatforge <stage>` and `torchrun -m chatforge <stage>` enter the same CLI."""

from chatforge.cli import main

if __name__ == "__main__":
    main()
