"""Triton kernels of fusedrect, installed as fusedrect.kernels (none yet: the GPU path arrives with them)."""
