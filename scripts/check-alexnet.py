"""Checks `--model alexnet` against torchvision's AlexNet, end to end (run by hand; needs torch).

1. Builds torchvision.models.alexnet(num_classes=10) with seed 0 and saves its state dict.
2. Runs `squeezetrain train` from those weights: 2 SGD steps (lr 0.01, momentum 0.9, weight decay
   5e-4, constant) of batch 16 on the first 32 CIFAR-10 training records in file order, upsampled
   bilinearly to 64×64, no augmentation, dropout off.
3. Does the same steps in PyTorch and compares the losses and every tensor of the final weights.

Usage: python scripts/check-alexnet.py SQUEEZETRAIN DATA_DIR WORK_DIR
Needs: torch, torchvision, safetensors, numpy.
"""
import json, subprocess, sys, numpy as np, torch, torch.nn.functional as F, torchvision
from safetensors.torch import load_file, save_file

binary, data, work = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
torch.set_num_threads(1)
m = torchvision.models.alexnet(num_classes=10)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{work}/alexnet-init.safetensors")

subprocess.run([binary, "train", "--model", "alexnet", "--data", data, "--init-weights", f"{work}/alexnet-init.safetensors",
                "--no-augment", "--no-shuffle", "--dropout", "0", "--schedule", "constant", "--lr", "0.01",
                "--momentum", "0.9", "--weight-decay", "5e-4", "--batch-size", "16", "--steps", "2", "--no-eval",
                "--threads", "2", "--metrics", f"{work}/alexnet-metrics.jsonl",
                "--save-weights", f"{work}/alexnet-ours.safetensors"], check=True)
ours_losses = [json.loads(l)["loss"] for l in open(f"{work}/alexnet-metrics.jsonl") if '"loss"' in l]

for mod in m.classifier:
    if isinstance(mod, torch.nn.Dropout): mod.p = 0.0
m.train()
raw = np.fromfile(f"{data}/data_batch_1.bin", dtype=np.uint8)[: 32 * 3073].reshape(32, 3073)
labels = torch.from_numpy(raw[:, 0].astype(np.int64))
x = torch.from_numpy(raw[:, 1:].reshape(32, 3, 32, 32).astype(np.float32) / 255.0)
x = (x - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
losses = []
for step in range(2):
    opt.zero_grad()
    loss = F.cross_entropy(m(x[step * 16:(step + 1) * 16]), labels[step * 16:(step + 1) * 16])
    losses.append(loss.item())
    loss.backward()
    opt.step()

print("losses: pytorch", losses, "squeezetrain", ours_losses)
ours, init = load_file(f"{work}/alexnet-ours.safetensors"), load_file(f"{work}/alexnet-init.safetensors")
worst = 0.0
for k, v in m.state_dict().items():  # compare the updates (after − before), not the weights
    theirs_update, ours_update = v - init[k], ours[k] - init[k]
    d = (ours_update - theirs_update).abs().max().item() / max(theirs_update.abs().max().item(), 1e-12)
    worst = max(worst, d)
    print(f"{k:24s} {tuple(v.shape)!s:20s} max |update diff| / max |update| = {d:.2e}")
ok = worst < 1e-3 and all(abs(a - b) < 1e-4 for a, b in zip(losses, ours_losses)) and len(ours_losses) == 2
print("OK" if ok else "MISMATCH", f"(worst relative update difference {worst:.2e})")
sys.exit(0 if ok else 1)
