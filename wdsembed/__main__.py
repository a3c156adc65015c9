"""`python -m wdsembed ...`: the same command as `wdsembed` (wdsembed.cli)."""
import sys

from wdsembed.cli import main

if __name__ == "__main__":
    sys.exit(main())
