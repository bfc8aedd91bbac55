"""Thin wrapper: same as `paddle-mm train`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
