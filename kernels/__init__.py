"""Triton kernels of spidr.ops, installed as ``spidr.kernels``.

Importing this package never imports triton: each kernel module does, and spidr.ops registers the
``triton`` backend only once its kernels are complete and triton can be imported.
"""
