#!/usr/bin/python3
"""An excb backbone in PyTorch: torchvision's ResNet class, shaped as the file says, its weights loaded
with strict=True.

    import sys; sys.path.insert(0, "tools")
    from excb_torch import load_backbone
    net = load_backbone("backbone.safetensors")  # torchvision.models.resnet.ResNet, fc = Identity, eval()
    features = net(x)                             # (N, D): what excb eval and excb features compute

FILE is `excb export RUN --backbone-only --out FILE` (torchvision's names) or a full export (the
"backbone." entries are taken). Its __metadata__ holds excb's config: the stem (imagenet: torchvision's
own 7x7 conv and max-pool; cifar: a 3x3 conv, stride 1, no max-pool), block, widths, blocks; the input
channels come from conv1. An excb resnet50 or ImageNet-stem resnet18 is exactly torchvision.models.
resnet50() / resnet18() with fc = Identity, and loads into those directly:

    from safetensors.torch import load_file          # pip install safetensors
    net = torchvision.models.resnet50(); net.fc = torch.nn.Identity()
    net.load_state_dict(load_file("backbone.safetensors"), strict=True)

x is normalised as excb's evaluation view: (pixel / 255 - mean) / std per channel, with the constants
the file's __metadata__ gives as excb.input_mean and excb.input_std (input_normalisation(FILE) returns
them): ImageNet's, and for one channel their luma-weighted mean. Needs python3-torch and
python3-torchvision (Debian); this file reads the safetensors format itself.

    python3 tools/excb_torch.py FILE      loads it and prints the network's shape and parameter count
"""
import json
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

NUMPY = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "F64": np.float64, "U8": np.uint8}


class TorchvisionResNet(ResNet):
    """torchvision's ResNet with other stage widths (its layers made by its own _make_layer), the CIFAR
    stem when asked, and fewer than four stages (the missing layers are Identity: no tensors)."""

    def __init__(self, block, layers, widths, in_ch=3, cifar=False, num_classes=10):
        super().__init__(block, [max(n, 1) for n in layers] + [1] * (4 - len(layers)))
        self.inplanes = widths[0]
        k, s, p = (3, 1, 1) if cifar else (7, 2, 3)
        self.conv1 = nn.Conv2d(in_ch, widths[0], kernel_size=k, stride=s, padding=p, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        if cifar:
            self.maxpool = nn.Identity()
        for i in range(4):
            layer = self._make_layer(block, widths[i], layers[i], stride=1 if i == 0 else 2) if i < len(layers) else nn.Identity()
            setattr(self, f"layer{i + 1}", layer)
        self.fc = nn.Linear(widths[len(layers) - 1] * block.expansion, num_classes)
        for m in self.modules():  # torchvision's own initialisation (resnet.py, ResNet.__init__)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def read_safetensors(path):
    """{name: tensor} and the metadata of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        a = np.frombuffer(blob, dtype=NUMPY[e["dtype"]], count=(end - b) // np.dtype(NUMPY[e["dtype"]]).itemsize,
                          offset=base + b)
        tensors[name] = torch.from_numpy(a.copy()).reshape(e["shape"])
    return tensors, meta


def config_of(meta):
    """excb's config text ("key = value" lines) as a dict of strings."""
    out = {}
    for line in meta.get("excb.config", "").splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def input_normalisation(path):
    """(mean, std): one float per input channel, as excb normalises its views."""
    _, meta = read_safetensors(path)
    return ([float(v) for v in meta["excb.input_mean"].split(",")], [float(v) for v in meta["excb.input_std"].split(",")])


def load_backbone(path):
    tensors, meta = read_safetensors(path)
    if any(k.startswith("backbone.") for k in tensors):  # a full export: its backbone
        tensors = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    cfg = config_of(meta)
    if not cfg:
        raise SystemExit(f"{path}: no excb config in __metadata__ (not an excb export)")
    widths = [int(w) for w in cfg["widths"].split(",")]
    layers = [int(b) for b in cfg["blocks"].split(",")]
    block = Bottleneck if cfg["block"] == "bottleneck" else BasicBlock
    net = TorchvisionResNet(block, layers, widths, in_ch=tensors["conv1.weight"].shape[1], cifar=cfg["stem"] == "cifar")
    net.fc = nn.Identity()
    net.load_state_dict(tensors, strict=True)
    return net.eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    net = load_backbone(sys.argv[1])
    print(f"{sys.argv[1]}: loaded with strict=True into torchvision's ResNet class, "
          f"{sum(p.numel() for p in net.parameters())} parameters")
    print(net)
