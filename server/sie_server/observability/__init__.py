"""Counters and histograms updated where batches form and run."""
