"""The daemon: the mirror's parts wired together, the service tree, workers, start-up."""
