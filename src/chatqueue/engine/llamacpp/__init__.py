"""The llama.cpp engine: a GGUF model through llama-cpp-python, batched decode of every running
sequence in one `llama_decode`, per-sequence KV slots with prefix reuse, chatqueue's sampler.
(slots.py needs no llama.cpp: the package imports nothing here.)"""
