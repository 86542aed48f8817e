"""Random-access data sources (grain `RandomAccessDataSource` protocol) and benchmark loaders."""

from mmret_jax.data.sources.amazon_reviews import (AmazonC4, PairsSource, clean_text, load_amazon_c4,
                                                   meta_text, review_text, split_pairs)

__all__ = ["AmazonC4", "PairsSource", "clean_text", "load_amazon_c4", "meta_text", "review_text",
           "split_pairs"]
