import sys

from gradprobe_dist.cli import main

if __name__ == "__main__":  # not in a spawned worker process, which imports this module too
    sys.exit(main())
