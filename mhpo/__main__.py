"""`python -m mhpo ...` (and `torchrun -m mhpo train ...`) run the command line."""

from mhpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
