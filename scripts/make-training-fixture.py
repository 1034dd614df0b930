"""Writes the PyTorch side of the trainer's determinism test (Tests/SqueezeTrainingTests/Fixtures).

Four SGD steps (lr 0.01, momentum 0.9, weight decay 5e-4, constant) of batch 32 on the first 128
CIFAR-10 training records in file order (data_batch_1.bin), scaled to [0, 1] and normalised per
channel, no augmentation, dropout off, starting from the golden initial weights.
Saves the loss before each step and the parameters after the last one.

Usage: python scripts/make-training-fixture.py SHARED_DIR OUT.safetensors
Needs: torch, torchvision, safetensors, numpy.
"""
import sys, numpy as np, torch, torch.nn as nn, torchvision
from safetensors.torch import load_file, save_file

shared, out = sys.argv[1], sys.argv[2]
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
m = torchvision.models.squeezenet1_1(num_classes=10)
m.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
m.load_state_dict(load_file(f"{shared}/reference/squeezenet_cifar_golden/init.safetensors"), strict=True)
m.classifier[0].p = 0.0
m.train()
raw = np.fromfile(f"{shared}/data/cifar-10-batches-bin/data_batch_1.bin", dtype=np.uint8)[: 128 * 3073].reshape(128, 3073)
labels = torch.from_numpy(raw[:, 0].astype(np.int64))
x = torch.from_numpy(raw[:, 1:].reshape(128, 3, 32, 32).astype(np.float32) / 255.0)
mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
x = (x - mean) / std
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
losses = []
for step in range(4):
    xb, yb = x[step * 32:(step + 1) * 32], labels[step * 32:(step + 1) * 32]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(m(xb), yb)
    losses.append(loss.item())
    loss.backward()
    opt.step()
result = {"losses": torch.tensor(losses)}
for k, v in m.state_dict().items():
    result["after." + k] = v.detach().clone().contiguous()
save_file(result, out)
print("losses", losses)
