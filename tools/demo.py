"""Thin wrapper: same as `paddle-mm demo`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo"] + sys.argv[1:]))
