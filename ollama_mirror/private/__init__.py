"""Private models: pushed to the mirror with Ollama's own keys, never asked of an upstream."""
