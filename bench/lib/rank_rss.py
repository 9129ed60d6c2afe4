"""``python -m bench.lib.rank_rss DIR MODULE [ARGS...]``: run MODULE as ``__main__`` with
ARGS, then write this process's whole-life peak RSS to ``DIR/rank-<RANK>.json`` (RANK from
torchrun's environment, 0 without it), however the module exits. ``ranks.torchrun_module``
puts it in front of every rank."""
from __future__ import annotations

import os
import runpy
import sys

from bench.lib.memory import write_peak_rss


def main() -> None:
    directory, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        raise
    except BaseException:
        code = 1
        raise
    finally:
        write_peak_rss(directory, int(os.environ.get("RANK", "0")), exit_code=code)


if __name__ == "__main__":
    main()
