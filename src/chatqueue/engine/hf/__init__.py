"""Runners over Hugging Face transformers models; `loader.load_hf_runner` builds one from local files.

Kept empty so that importing `sampling` alone does not pull in transformers."""
