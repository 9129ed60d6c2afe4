import sys

from gradprobe_dist.cli import main

sys.exit(main())
