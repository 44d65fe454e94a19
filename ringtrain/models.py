"""Models, written here so no torchvision is needed (its PyPI wheels do not import beside
every torch build). Each builder takes the input shape (C, H, W) and the number of classes.

    mlp        two hidden layers; cheap compute, so communication dominates (a "comm-heavy" model)
    mlp-wide   five 1024-wide hidden layers (~4.3 M parameters on 8x8 input): communication-heavy
    cnn        a small two-conv network, the default on digits
    alexnet    AlexNet adapted to 32x32 CIFAR images (the network the DistNet project trained)
    resnet18   ResNet-18, CIFAR variant (3x3 stem, no max-pool)
    resnet50   ResNet-50, CIFAR variant (bottleneck blocks)
"""
from __future__ import annotations

import torch
from torch import nn


def mlp(shape, num_classes, hidden=256):
    c, h, w = shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def mlp_wide(shape, num_classes, hidden=1024, depth=5):
    """Five 1024-wide hidden layers (about 4 MiB of gradient each): many equal buckets, so
    all but the first layer's all-reduce can hide behind the backward of earlier layers."""
    c, h, w = shape
    layers = [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self, shape, num_classes):
        super().__init__()
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNetCIFAR(nn.Module):
    """AlexNet's five conv + three FC layers, with strides and pooling sized for 32x32 input."""

    def __init__(self, shape, num_classes):
        super().__init__()
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(n, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): 3x3 stem without max-pool, four stages."""

    def __init__(self, block, layers, shape, num_classes):
        super().__init__()
        c = shape[0]
        self.cin = 64
        self.stem = nn.Sequential(nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(self.cin, planes, stride))
                self.cin = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


MODELS = {
    "mlp": mlp,
    "mlp-wide": mlp_wide,
    "cnn": SmallCNN,
    "alexnet": AlexNetCIFAR,
    "resnet18": lambda shape, k: ResNet(BasicBlock, (2, 2, 2, 2), shape, k),
    "resnet50": lambda shape, k: ResNet(Bottleneck, (3, 4, 6, 3), shape, k),
}


def build_model(name: str, shape, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](tuple(shape), num_classes)
