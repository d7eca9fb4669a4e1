"""`python -m rellax ...`: the CLI, for launchers that run a module (torchrun -m rellax train ...)."""

from rellax.cli import main

if __name__ == "__main__":
    main()
