"""The `gptoss-mac` command: a thin Typer app over mlx_gptoss (installed as mlx_gptoss.cli)."""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):
    _os.write(2, b"\ninterrupted\n")
    _os._exit(130)


def on_ctrl_c(signum, frame):
    """Ctrl-C once a command runs: a KeyboardInterrupt (a reply stops, a load cleans up), except inside the
    import machinery, where it can be swallowed (a module lock's weakref callback ignores exceptions: the
    command would go on as if nothing was pressed); nothing needs cleaning up while modules import."""
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        _interrupted_while_starting(signum, frame)
    raise KeyboardInterrupt


# Started as the command (the console script, or `python -m mlx_gptoss.cli.app`, during which argv[0] is
# "-m"): a Ctrl-C while the command's modules import is one line and status 130, not a traceback. main()
# turns Ctrl-C back into KeyboardInterrupt once it runs. Imported by anything else, nothing changes.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("gptoss-mac", "-m"):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
