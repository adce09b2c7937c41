"""Implementations of the MLC loss: ``reference`` (literal), ``gram_torch`` (Gram route in torch ops),
``triton_kernels`` (the fused kernel). Each exposes ``<name>_mlc_loss(reps, present, tau, objective)``
returning the per-prompt loss; the public dispatcher lives in ``mlc_kernels.loss``."""
