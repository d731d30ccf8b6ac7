"""A deployment script: write a circus-wsgi stack's configuration with the Python API.

    python examples/deploy.py /srv/hello      # writes config.sqlite, mongrel2.conf, circus.ini
    circusd /srv/hello/circus.ini             # runs mongrel2, the dispatcher and the workers

Copy it and change the Settings; every option is listed by ``circus-wsgi config --help``.
"""

import sys
from pathlib import Path

from circus_wsgi import Settings, SettingsError, write_configs

EXAMPLES = Path(__file__).resolve().parent


def main(out: str) -> int:
    try:
        settings = Settings(
            app="examples.hello:app",
            chdir=str(EXAMPLES.parent),  # the workers import examples.hello from here
            bind="127.0.0.1:8000",
            workers=2,
            static={"/static": str(EXAMPLES / "static")},
        )
        paths = write_configs(settings, out)
    except SettingsError as error:
        print(f"deploy: {error}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"start it: circusd {paths['circus.ini']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIRECTORY")
    sys.exit(main(sys.argv[1]))
