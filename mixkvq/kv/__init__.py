"""The KV cache framework every method builds on: the quantizer, ragged buffers, packed stores and their layouts,
the paged stores of the CUDA kernel, the cache and its attention binding, and the method base class and registry."""
