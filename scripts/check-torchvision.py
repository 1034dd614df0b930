"""Checks weights written by squeezetrain against torchvision, both ways.

1. A file from `squeezetrain train --save-weights` loads into torchvision's SqueezeNet with
   strict=True (for --stem cifar, features.0 swapped for Conv2d(3, C, 3, stride 1, padding 1)).
2. torchvision's own state dict, saved as safetensors, is written to OUT_DIR for
   `squeezetrain eval --weights` / `train --init-weights` to load.

Usage: python scripts/check-torchvision.py WEIGHTS.safetensors MODEL STEM CLASSES [OUT_DIR]
Needs: torch, torchvision, safetensors.
"""
import sys, torch, torch.nn as nn, torchvision
from safetensors.torch import load_file, save_file

path, model, stem, classes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = getattr(torchvision.models, model)(num_classes=classes)
if stem == "cifar":
    out = m.features[0].out_channels
    m.features[0] = nn.Conv2d(3, out, kernel_size=3, stride=1, padding=1)
state = load_file(path)
m.load_state_dict(state, strict=True)
m.eval()
print(f"{path}: loaded into torchvision {model} ({stem} stem, {classes} classes) with strict=True; "
      f"{sum(p.numel() for p in m.parameters()):,} parameters")
if len(sys.argv) > 5:
    torch.manual_seed(0)
    ref = getattr(torchvision.models, model)(num_classes=classes)
    if stem == "cifar":
        ref.features[0] = nn.Conv2d(3, ref.features[0].out_channels, kernel_size=3, stride=1, padding=1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, f"{sys.argv[5]}/torchvision-{model}-{stem}.safetensors")
    print(f"wrote {sys.argv[5]}/torchvision-{model}-{stem}.safetensors")
