"""Data: raw datasets -> webdataset shards (sources, shards, demo) -> per-rank batches (stream)."""
