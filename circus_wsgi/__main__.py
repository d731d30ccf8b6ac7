"""``python -m circus_wsgi`` is the ``circus-wsgi`` command."""

from .cli import main

raise SystemExit(main())
