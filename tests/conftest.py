"""Shared fixtures. The small CNN has random weights: it tests mechanics only, never accuracy."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU6 stem with "same" padding, a depthwise block with a residual add, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.clamp(self.bn(self.stem(self.pad(x))), 0, 6)
        y = torch.relu(self.expand(x))
        y = nn.functional.relu6(self.dw(y))
        x = x + self.project(y)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def make_small_cnn(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="session")
def small_cnn():
    return make_small_cnn()


@pytest.fixture(scope="session")
def small_program(small_cnn):
    from qwt_deploy.load.capture import export_program

    return export_program(small_cnn, torch.zeros(2, 3, 32, 32))


@pytest.fixture(scope="session")
def mech_data():
    """Random inputs: for mechanics tests only."""
    return np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)


def op_counts(model):
    import collections

    return collections.Counter(n.op_type for n in model.graph.node)
