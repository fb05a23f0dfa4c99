"""Datasets: IWSLT 2017 English-German (needs the `tensorflow` extra)."""
