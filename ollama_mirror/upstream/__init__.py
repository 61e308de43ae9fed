"""The upstream registries, as the mirror's HTTP client sees them."""
