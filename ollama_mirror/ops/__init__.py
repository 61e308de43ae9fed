"""What an operator sees: metrics, stats, health, request and fill logs, where logs go."""
