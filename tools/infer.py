"""Thin wrapper: same as `paddle-mm infer`."""
import sys

from paddle_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer"] + sys.argv[1:]))
