"""The cache on disk: the Ollama models directory, its index, what it holds, its limits, bundles."""
