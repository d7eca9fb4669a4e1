"""`python -m cli ...`: the CLI, for launchers that run a module (torchrun -m cli train ...)."""

from cli.main import main

if __name__ == "__main__":
    main()
