"""C kernels compiled on first use with the machine's compiler: where MindSpore's CPU kernels are slow."""
