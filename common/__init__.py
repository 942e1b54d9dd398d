"""Framework-free core of bn-compare: the batch-norm spec and its conventions, the float64 NumPy
reference, the Fashion-MNIST loader, the canonical LeNet-BN parameters and report writers.

Nothing in this package imports PyTorch, MXNet or JAX (a test checks it in a subprocess)."""
