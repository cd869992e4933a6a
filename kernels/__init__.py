"""Triton kernels of fusedrect, installed as fusedrect.kernels: the BatchNorm + ReLU/PReLU ops (bn_act) and the
pre-activation convolution (preact_conv); fusedrect.ops registers them as the ``triton`` backend."""
