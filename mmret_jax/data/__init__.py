"""Data: tokenizers, sources, preprocessing scripts and bundled samples."""
