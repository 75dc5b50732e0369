"""What the absl scripts of experiments/ share: one-line errors, and flag parsing that fails in one line."""
import sys

from absl import app, flags


def fail(message: str, code: int = 1):
    """Ends the process with `error: <message>` on stderr (one line) and exit code `code` (2 = usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main) -> None:
    """absl's app.run(main), with a bad flag reported as one `error:` line and exit code 2."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(str(e).splitlines()[0], 2)
    app.run(main, flags_parser=parse)
