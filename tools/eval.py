"""Thin wrapper: same as `paddle-mm eval`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
