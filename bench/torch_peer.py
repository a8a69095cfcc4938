#!/usr/bin/python3
"""Runs the PyTorch peer (../shared/bench/torch_excb.py) at a stated GPU precision.

usage: torch_peer.py fp32|tf32 PATH/torch_excb.py [its arguments...]

PyTorch's defaults are mixed: matmuls in FP32 but cuDNN convolutions allowed to use TF32. To compare
like with like, this wrapper sets both switches from the first argument before the peer runs:
  fp32  torch.backends.cuda.matmul.allow_tf32 = False, torch.backends.cudnn.allow_tf32 = False
  tf32  both True
The peer reports both switches in its JSON line (tf32_matmul, tf32_cudnn), so the record says which ran.
"""
import runpy
import sys

import torch

if len(sys.argv) < 3 or sys.argv[1] not in ("fp32", "tf32"):
    sys.exit(__doc__)
tf32 = sys.argv[1] == "tf32"
torch.backends.cuda.matmul.allow_tf32 = tf32
torch.backends.cudnn.allow_tf32 = tf32
peer = sys.argv[2]
sys.argv = [peer] + sys.argv[3:]
runpy.run_path(peer, run_name="__main__")
