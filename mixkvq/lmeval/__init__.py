"""lm-evaluation-harness on any method's cache: the `hf-kvq` model, the run loop and lm-eval's CLI with it."""
