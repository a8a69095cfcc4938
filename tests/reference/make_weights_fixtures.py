#!/usr/bin/python3
"""Write the weights fixtures that tests/test_weights.c loads: PyTorch state dicts and PyTorch's features.

Each fixture is a network built by torchvision's own ResNet class (torchvision.models.resnet), so its
state dict has exactly torchvision's names, initialised by torchvision's own init, then given BatchNorm
affine parameters and running statistics that are not the trivial 1/0 (a few training-mode forwards on
random images, and random gamma/beta), so that every tensor's mapping is tested. Widths are cut to keep
the files small; the names, the stems, the max-pool and the downsample units are torchvision's.

    NAME.safetensors           the state dict (written by the safetensors library, the file PyTorch users make)
    NAME.features.safetensors  "input" (N, C, H, W) F32, "features" (N, D) F32: PyTorch's pooled backbone
                               output in eval mode (fc replaced by Identity, as DINO and SwAV do)
    __metadata__ of the second: "config", the excb settings the test expects excb to read off the names

Needs python3-torch, python3-torchvision and `pip install safetensors` to REGENERATE; CI never runs it.
    /tmp/venv/bin/python tests/reference/make_weights_fixtures.py [OUT_DIR] [--full]
--full also writes torchvision's real resnet18 and resnet50 (46 MB and 98 MB, not committed): the
test reads any fixture directory named by EXCB_WEIGHTS_FIXTURES.
"""
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from excb_torch import TorchvisionResNet as CutResNet  # noqa: E402 -- torchvision's class, cut widths


def settle(net, in_ch, side, gen):
    """BN statistics from training-mode forwards, then random affine parameters."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, in_ch, side, side, generator=gen) * 1.5 + 0.3)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    net.eval()


def write(out, name, net, in_ch, side, config, gen, prefix="", extra=None):
    settle(net, in_ch, side, gen)
    x = torch.randn(4, in_ch, side, side, generator=gen)
    fc, net.fc = net.fc, nn.Identity()
    with torch.no_grad():
        f = net(x).contiguous()
    net.fc = fc
    sd = {prefix + k: v.contiguous() for k, v in net.state_dict().items()}
    sd.update(extra or {})
    save_file(sd, os.path.join(out, name + ".safetensors"))
    save_file({"input": x.contiguous(), "features": f}, os.path.join(out, name + ".features.safetensors"),
              metadata={"config": config, "source": "torchvision " + __import__("torchvision").__version__})
    print(f"{name}: {len(sd)} tensors, features {tuple(f.shape)}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    # torchvision's ResNet-18 topology (BasicBlock [2, 2, 2, 2], 7x7 stem, max-pool) at 1/8 width
    write(out, "resnet18_w8", CutResNet(BasicBlock, [2, 2, 2, 2], [8, 16, 32, 64]), 3, 64,
          "stem=imagenet block=basic widths=8,16,32,64 blocks=2,2,2,2 in_ch=3", gen)
    # the CIFAR variant of the same (conv1 3x3 stride 1, no max-pool), solo-learn's and SwAV's CIFAR net
    write(out, "resnet18_cifar_w8", CutResNet(BasicBlock, [2, 2, 2, 2], [8, 16, 32, 64], cifar=True), 3, 32,
          "stem=cifar block=basic widths=8,16,32,64 blocks=2,2,2,2 in_ch=3", gen)
    # a CIFAR ResNet-8 on gray images (3 stages of 1 block, 16-32-64), excb's resnet8s, under DINO's
    # checkpoint layout: teacher./student. sets, DDP's module., the backbone. prefix and a head to ignore
    net = CutResNet(BasicBlock, [1, 1, 1], [16, 32, 64], in_ch=1, cifar=True)
    settle(net, 1, 28, gen)
    student = {f"student.module.backbone.{k}": (v + 0.01 if v.is_floating_point() else v.clone()).contiguous()
               for k, v in net.state_dict().items()}
    student["student.module.head.last_layer.weight"] = torch.randn(5, 64, generator=gen)
    write(out, "resnet8_gray_dino", net, 1, 28, "stem=cifar block=basic widths=16,32,64 blocks=1,1,1 in_ch=1", gen,
          prefix="teacher.backbone.", extra=dict(student, **{"teacher.head.last_layer.weight": torch.randn(5, 64, generator=gen)}))
    # Bottleneck blocks (ResNet-50's, v1.5: the stride on the 3x3) at 1/16 width, one block per stage
    write(out, "resnet50_w16_b1", CutResNet(Bottleneck, [1, 1, 1, 1], [4, 8, 16, 32]), 3, 64,
          "stem=imagenet block=bottleneck widths=4,8,16,32 blocks=1,1,1,1 in_ch=3", gen)
    if "--full" in sys.argv:
        import torchvision
        for arch, side in (("resnet18", 64), ("resnet50", 64)):
            blocks = {"resnet18": "2,2,2,2", "resnet50": "3,4,6,3"}[arch]
            block = "basic" if arch == "resnet18" else "bottleneck"
            write(out, arch, getattr(torchvision.models, arch)(), 3, side,
                  f"stem=imagenet block={block} widths=64,128,256,512 blocks={blocks} in_ch=3", gen)


if __name__ == "__main__":
    main()
