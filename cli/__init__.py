"""The `gptoss-mac` command: a thin Typer app over mlx_gptoss (installed as mlx_gptoss.cli)."""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):
    _os.write(2, b"\ninterrupted\n")
    _os._exit(130)


# Started as the command (the console script, or `python -m mlx_gptoss.cli.app`, during which argv[0] is
# "-m"): a Ctrl-C while the command's modules import is one line and status 130, not a traceback. main()
# turns Ctrl-C back into KeyboardInterrupt once it runs. Imported by anything else, nothing changes.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("gptoss-mac", "-m"):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
