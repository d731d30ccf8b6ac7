"""circus-wsgi: any WSGI application behind Mongrel2, every process under Circus."""

from typing import Any

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "write_configs", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # write_configs brings circus and every generator: imported when first asked for, so
    # that `python -m circus_wsgi.lifeline` (mongrel2's wrapper) stays light
    if name == "write_configs":
        from .deploy import write_configs

        return write_configs
    raise AttributeError(f"module 'circus_wsgi' has no attribute {name!r}")
