"""An application that cannot start: importing it exits the process with status 1."""

import sys

sys.exit("crash_app: failing at import, on purpose")
