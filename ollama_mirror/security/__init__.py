"""Who may do what: API keys, registry keys, model rules, rate limits, request limits, TLS."""
