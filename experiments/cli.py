"""What the absl scripts of experiments/ share: one-line errors, and flag parsing that fails in one line."""
import os
import sys

from absl import app, flags


def fail(message: str, code: int = 1):
    """Ends the process with `error: <message>` on stderr (one line) and exit code `code` (2 = usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # os._exit, not sys.exit: after a failed checkpoint read, orbax's background event-loop thread can print a
    # traceback during interpreter shutdown, which would break the one-line promise. Nothing is left to flush.
    os._exit(code)


def run(main) -> None:
    """absl's app.run(main), with a bad flag reported as one `error:` line and exit code 2."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(str(e).splitlines()[0], 2)
    app.run(main, flags_parser=parse)
