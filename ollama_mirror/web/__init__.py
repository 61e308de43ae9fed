"""The HTTP tree: the registry (/v2), Ollama (/api), operator (/mirror) and inference routes."""
