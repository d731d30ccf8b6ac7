"""circus-wsgi: any WSGI application behind Mongrel2, every process under Circus."""

from .deploy import write_configs
from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "write_configs", "__version__"]
__version__ = "0.1.0"
