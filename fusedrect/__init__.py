"""fusedrect: fused BatchNorm + ReLU/PReLU layers for PyTorch.

    from fusedrect import FusedBNPReLU
    layer = FusedBNPReLU(64)          # replaces nn.Sequential(nn.BatchNorm2d(64), nn.PReLU(64))
"""
from fusedrect import functional, init, reference
from fusedrect.buffer_cache import buffer_cache_info, empty_buffer_cache, set_buffer_cache_limit
from fusedrect.convert import convert_model, revert_model
from fusedrect.functional import bn_prelu, bn_relu, preact_conv2d
from fusedrect.modules import FusedBNPReLU, FusedBNReLU, FusedPreActConv2d
from fusedrect.ops._backend import BACKENDS, build_info
from fusedrect.sync_batchnorm import FusedSyncBNPReLU, FusedSyncBNReLU, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FusedBNPReLU",
    "FusedBNReLU",
    "FusedPreActConv2d",
    "FusedSyncBNPReLU",
    "FusedSyncBNReLU",
    "bn_prelu",
    "bn_relu",
    "buffer_cache_info",
    "build_info",
    "convert_model",
    "convert_sync_batchnorm",
    "empty_buffer_cache",
    "functional",
    "init",
    "preact_conv2d",
    "reference",
    "revert_model",
    "set_buffer_cache_limit",
]
