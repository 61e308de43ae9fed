"""ollama-mirror: a pull-through caching mirror for the Ollama model registry.

Importing this package stays cheap (no reactor, no klein) so that the twistd dropin and
embedding applications choose when the reactor is installed.  Build the daemon with
:func:`ollama_mirror.daemon.service.build_service`.
"""

__version__ = "0.1.0"
