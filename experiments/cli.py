"""What the absl scripts of experiments/ share: one-line errors, and flag parsing that fails in one line."""
import os
import sys

from absl import app, flags

STOPPED = 143  # 128 + SIGTERM: the exit code of a run that a stop request ended at a checkpoint (rerun to resume)


def fail(message: str, code: int = 1):
    """Ends the process with `error: <message>` on stderr (one line) and exit code `code` (2 = usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Background threads of a dependency (TensorStore after a failed checkpoint read, see
    # checkpoint.reading) must not add lines after ours: stderr goes quiet, and os._exit skips the
    # interpreter shutdown during which they would print. Nothing is left to flush.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os._exit(code)


def run(main) -> None:
    """absl's app.run(main), with a bad flag reported as one `error:` line and exit code 2."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(str(e).splitlines()[0], 2)
    app.run(main, flags_parser=parse)
