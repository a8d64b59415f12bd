"""`python -m engine.cli`: the `refloop` command."""

from engine.cli.main import main

if __name__ == "__main__":
    main(prog_name="refloop")  # not "python -m engine.cli" in usage errors (docs/cli.md)
