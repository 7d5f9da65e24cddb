"""Hydra plugin: the sweeper that runs the paper's tables (``hydra/sweeper=rows``, docs/reproduce.md)."""
