"""Thin wrapper: same as `paddle-mm plot`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot"] + sys.argv[1:]))
