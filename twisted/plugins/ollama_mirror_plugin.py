"""The twistd dropin: ``twistd -n ollama-mirror``.

Kept to one lazy ``ServiceMaker`` so that plugin discovery never imports klein, treq or the
reactor before twistd has installed the one the user asked for.
"""

from twisted.application.service import ServiceMaker

ollamaMirror = ServiceMaker(
    "Ollama registry mirror",
    "ollama_mirror.tap",
    "Pull-through caching mirror for the Ollama model registry.",
    "ollama-mirror",
)
