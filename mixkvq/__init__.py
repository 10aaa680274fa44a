"""KV-cache quantization harness for long chain-of-thought reasoning models."""
