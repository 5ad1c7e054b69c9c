"""The models of the bench's model table (``python -m fastbn.bench --torch``), plain PyTorch.

No torchvision: each architecture is written here after torchvision's
definition, in the parts that matter to batch norm (the modules, their order,
in-place activations, the residual adds):

- ``resnet18``: torchvision's ResNet-18: stem conv 7x7/2 - BN - ReLU(inplace)
  - maxpool 3x3/2, four stages of two BasicBlocks (64, 128, 256, 512
  channels; conv3x3 - BN - ReLU(inplace) - conv3x3 - BN, ``out += identity``,
  ReLU(inplace); a 1x1 conv - BN downsample where the shape changes), global
  average pool, fc. Full width, 11.2 M parameters.
- ``mobilenetv2``: torchvision's MobileNetV2 at width multiplier 1.0 and its
  full block list: stem conv 3x3/2 - BN - ReLU6(inplace), 17 inverted residual
  blocks (1x1 expand conv - BN - ReLU6(inplace) where the expansion is not 1,
  depthwise 3x3 conv - BN - ReLU6(inplace), 1x1 project conv - BN,
  ``x + block(x)`` at stride 1 with the same channels), 1x1 conv to 1280 - BN
  - ReLU6(inplace), global average pool, fc. The classifier's Dropout(0.2)
  is left out (a step's loss then depends on nothing but the weights and the
  data). 2.2 M parameters for 10 classes.
- ``vgg11_bn``: torchvision's VGG11-BN conv body (configuration "A": 64, M,
  128, M, 256, 256, M, 512, 512, M, 512, 512, M; each number a conv 3x3 -
  BN - ReLU(inplace), each M a maxpool 2x2/2), 8 BN. Its classifier here is
  a global average pool and one Linear(512, 10), not torchvision's three
  4096-wide linear layers: those hold 120 M of its 129 M parameters, so
  their SGD step (reading and writing half a gigabyte a step) would be the
  step's time, the classifier's and not the network's. 9.2 M parameters.
- ``r3d18``: torchvision's video ResNet r3d_18: stem Conv3d 3x7x7, stride
  (1, 2, 2) - BatchNorm3d - ReLU(inplace), four stages of two 3-D
  BasicBlocks (64, 128, 256, 512 channels, strides 1, 2, 2, 2; conv 3x3x3 -
  BN - ReLU(inplace) - conv 3x3x3 - BN, ``out += identity``, ReLU(inplace);
  a 1x1x1 conv - BN downsample where the shape changes), AdaptiveAvgPool3d(1),
  fc. 20 BatchNorm3d, 33.2 M parameters.
- ``cnn``: the small ResNet-style CNN of the contract's original step target
  (16-32-64 channels, three basic blocks, BN followed by ``nn.ReLU()`` inside
  ``nn.Sequential``).
- ``mlp``: 784-1024-1024-10 with BatchNorm1d and ReLU after each hidden linear.

Every model has 10 classes and torch's default initialization; the image
models take any image size their strides allow (VGG11-BN and R3D-18 32
pixels or more). The inputs (batch, image size, frames) are
`fastbn.bench.torch_mode`'s, which imports this
module in its workers only (the bench runs without torch).
"""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

N_CLASSES = 10


def conv_bn(c_in, c_out, stride=1, kernel=3):
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class SmallBlock(nn.Module):
    """The small CNN's block: conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv-BN where the
    shape changes), then ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(), *conv_bn(c_out, c_out))
        changes = stride != 1 or c_in != c_out
        self.shortcut = (
            nn.Sequential(*conv_bn(c_in, c_out, stride, kernel=1)) if changes else nn.Identity()
        )

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


def small_cnn():
    return nn.Sequential(
        *conv_bn(3, 16),
        nn.ReLU(),
        SmallBlock(16, 16, 1),
        SmallBlock(16, 32, 2),
        SmallBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, N_CLASSES),
    )


def mlp():
    return nn.Sequential(
        nn.Linear(784, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, N_CLASSES),
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: BN then ``self.relu`` in forward, ``out += identity``."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, n_classes=N_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        stages = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu6(c_in, c_out, kernel=3, stride=1, groups=1):
    """torchvision's Conv2dNormActivation with ReLU6: a Sequential of conv, BN, ReLU6(inplace)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand_ratio):
        super().__init__()
        hidden = round(c_in * expand_ratio)
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [conv_bn_relu6(c_in, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# torchvision's inverted residual setting: expansion t, channels c, repeats n, first stride s.
MOBILENETV2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, n_classes=N_CLASSES, blocks=MOBILENETV2_BLOCKS):
        super().__init__()
        c_in = 32
        features = [conv_bn_relu6(3, c_in, stride=2)]
        for t, c, n, s in blocks:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(conv_bn_relu6(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(1280, n_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# torchvision's VGG configuration "A" (VGG11): output channels of each conv 3x3, "M" a maxpool.
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11_bn():
    layers = []
    c_in = 3
    for v in VGG11_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c_in, N_CLASSES),
    )


def conv3d_bn(c_in, c_out, stride=1, kernel=3):
    """torchvision's Conv3DSimple (the same stride in time and space) and its BatchNorm3d."""
    return [
        nn.Conv3d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(c_out),
    ]


class BasicBlock3d(nn.Module):
    """torchvision's video BasicBlock: conv1 = conv-BN-ReLU(inplace), conv2 = conv-BN,
    ``out += residual``, ReLU(inplace)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Sequential(*conv3d_bn(c_in, c_out, stride), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(*conv3d_bn(c_out, c_out))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(*conv3d_bn(c_in, c_out, stride, kernel=1))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.relu(out)


class R3D18(nn.Module):
    def __init__(self, n_classes=N_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )
        stages = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock3d(c_in, c_out, stride), BasicBlock3d(c_out, c_out))
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


BUILDERS = {
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "vgg11_bn": vgg11_bn,
    "r3d18": R3D18,
    "cnn": small_cnn,
    "mlp": mlp,
}


def make_model(name):
    """A fresh torch model (torch's BatchNorm layers, default initialization) by name."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {tuple(BUILDERS)}")
    return BUILDERS[name]()


def without_bn(model):
    """The model with every BatchNorm (torch's or a subclass) replaced by nn.Identity, in place."""
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            without_bn(child)
    return model


def batch_norms(model):
    """The model's BatchNorm layers (torch's or a subclass), in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def count_bn(model):
    return len(batch_norms(model))
