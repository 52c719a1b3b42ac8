"""Text in and out: the Tokenizer protocol, incremental detokenization and stop strings."""
