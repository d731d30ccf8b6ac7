"""circus-wsgi: any WSGI application behind Mongrel2, every process under Circus."""

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "__version__"]
__version__ = "0.1.0"
