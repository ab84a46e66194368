"""Shared test helpers: a stand-in for TinyTorch's Tensor and a random source."""

import zlib

import numpy as np
import pytest


class Tensor:
    """The part of ``tinytorch.core.tensor.Tensor`` that cache code touches.

    Like TinyTorch's, the constructor copies into float32.
    """

    def __init__(self, data):
        self.data = np.array(data, dtype=np.float32)

    @property
    def shape(self):
        return self.data.shape

    def reshape(self, *shape):
        return Tensor(self.data.reshape(*shape))


@pytest.fixture
def rng(request):
    # a fresh, reproducible stream per test, never shared between tests
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
