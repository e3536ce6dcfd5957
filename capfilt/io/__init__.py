"""Reading and writing shards, through fsspec."""
