"""Text on the way out: incremental detokenization and stop strings."""
