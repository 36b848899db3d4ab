"""`python -m histod` is the same as the `histod` command."""

from histod.cli import main

if __name__ == "__main__":
    main()
