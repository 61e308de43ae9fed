"""``python -m ollama_mirror.config``: print the README's reference table."""

from .reference import reference_table

print(reference_table())
