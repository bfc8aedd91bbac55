"""Thin wrapper: same as `paddle-mm serve`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve"] + sys.argv[1:]))
