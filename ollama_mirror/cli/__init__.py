"""The ollama-mirror command."""
