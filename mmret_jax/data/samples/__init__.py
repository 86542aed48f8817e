"""Bundled sample data (`blair_pairs.tsv`) and the scripts that generate it."""
