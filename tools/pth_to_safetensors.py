#!/usr/bin/python3
"""Convert a PyTorch checkpoint (a .pth/.pt pickle) into a safetensors file that excb reads
(excb import, excb eval --weights, excb features --weights). C never reads pickle; this does.

    python3 tools/pth_to_safetensors.py CHECKPOINT.pth OUT.safetensors [--unsafe-pickle]

Nested dicts are flattened with '.': DINO's {"student": {...}, "teacher": {...}} becomes
teacher.backbone.conv1.weight, student.module.backbone.conv1.weight, ...; Lightning's "state_dict" becomes
state_dict.*, which excb does not strip: --key=state_dict takes that level alone. excb then strips
the prefixes teacher./student. (one set, the teacher's unless --student), module. and backbone., as prefixes.
Floating tensors are written as float32 (excb reads F32), integer and bool tensors as they are; entries
that are not tensors (epoch numbers, args) are listed and left out.

The pickle is loaded with torch.load(weights_only=True), which runs no code from the file. A checkpoint
holding other objects (DINO's saves an argparse.Namespace as "args") is refused by it: with
--unsafe-pickle it is loaded in full, which runs whatever the file contains. Only for files you trust.
Needs python3-torch (Debian) and nothing else.
"""
import json
import struct
import sys

import torch

DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def flatten(obj, prefix, out, skipped):
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}{k}.", out, skipped)
    else:
        skipped.append(prefix[:-1])


def write_safetensors(path, tensors, metadata):
    """The format exactly: u64 little-endian header length, the JSON header padded with spaces to a
    multiple of 8, then each tensor's bytes (C order, little-endian) back to back."""
    header, blobs, at = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        if t.dtype not in DTYPES:
            raise SystemExit(f"{name}: dtype {t.dtype} has no safetensors name here")
        raw = t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        raise SystemExit(__doc__)
    src, dst = args
    key = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--key=")), None)
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only="--unsafe-pickle" not in sys.argv)
    except Exception as e:  # noqa: BLE001 -- torch raises several kinds here
        raise SystemExit(f"{src}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e}).\n"
                         "If you trust the file, --unsafe-pickle loads it in full (this runs code from the file).")
    if key:
        ckpt = ckpt[key]
    tensors, skipped = {}, []
    flatten(ckpt, "", tensors, skipped)
    if not tensors:
        raise SystemExit(f"{src}: no tensors found")
    write_safetensors(dst, tensors, {"format": "pt", "converted_from": src})
    print(f"{dst}: {len(tensors)} tensors" + (f"; not tensors, left out: {', '.join(skipped)}" if skipped else ""))


if __name__ == "__main__":
    main()
