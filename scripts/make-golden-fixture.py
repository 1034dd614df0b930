"""Writes the PyTorch side of SqueezeNet's numeric test (Tests/Fixtures/squeezenet-step.safetensors).

The model of ../shared/reference (make_golden.py): torchvision's squeezenet1_1(num_classes=10) with
features.0 replaced by Conv2d(3, 64, kernel_size=3, stride=1, padding=1), dropout off, mean softmax
cross-entropy on a batch of 8 images of 3×32×32 with labels [3, 7, 0, 9, 1, 5, 2, 8]. Nothing large
is committed: the weights and the images come from a formula that the test computes too (the one
scripts/make-alexnet-fixture.py uses). Element i of the flat parameter vector (the tensors in
state_dict order, each flattened row-major) is bound × (2u − 1), with u = splitmix64(i) >> 11 / 2^53
and bound √(6 / fan-in) for a convolution's weight (the range of torchvision's kaiming_uniform_),
0.05·√3 for classifier.1.weight (as wide as make_golden.py's normal(std 0.05), so that logits are not
all zero behind the final ReLU) and 0.1 for every bias; element i of the images (NCHW) is 2 × (2u − 1)
with u from splitmix64(2^40 + i).

Saves (about 60 KB): `logits` (8, 10); `loss` (1); for every parameter tensor `gradnorm.<name>` (1),
the L2 norm of its gradient, and `grad.<name>` (m = min(64, count)), its gradient at the flat indices
⌊k × count / m⌋, k = 0…m−1; `sgd_losses` (3), the loss before each of three steps of
torch.optim.SGD(lr=0.002, momentum=0.9, weight_decay=5e-4) on the same batch, and for every parameter
`sgd_update.<name>` (m), how far those steps moved it, at the same indices.

Usage: python scripts/make-golden-fixture.py Tests/Fixtures/squeezenet-step.safetensors
Needs: torch, torchvision, safetensors, numpy.
"""
import math, sys, numpy as np, torch, torch.nn as nn, torch.nn.functional as F, torchvision
from safetensors.torch import save_file

M64 = np.uint64
LABELS = [3, 7, 0, 9, 1, 5, 2, 8]


def formula(start, count, scale):
    """scale × (2u − 1) for flat indices start…start+count−1, in float64, rounded once to float32."""
    z = np.arange(start, start + count, dtype=np.uint64) + M64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> M64(30))) * M64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> M64(27))) * M64(0x94D049BB133111EB)
    z ^= z >> M64(31)
    u = (z >> M64(11)).astype(np.float64) * 2.0 ** -53
    return (scale * (2 * u - 1)).astype(np.float32)


def sampled(t):
    """min(64, count) elements of t at the flat indices ⌊k × count / m⌋."""
    flat = t.reshape(-1)
    m = min(64, flat.numel())
    return flat[[k * flat.numel() // m for k in range(m)]].contiguous()


def main(out):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.seterr(over="ignore")  # splitmix64 multiplies modulo 2^64
    m = torchvision.models.squeezenet1_1(num_classes=10)
    m.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
    m.eval()  # dropout off
    offset = 0
    with torch.no_grad():
        for name, tensor in m.state_dict().items():
            if name.endswith(".bias"):
                bound = 0.1
            elif name == "classifier.1.weight":
                bound = 0.05 * math.sqrt(3)
            else:
                bound = math.sqrt(6 / math.prod(tensor.shape[1:]))
            tensor.copy_(torch.from_numpy(formula(offset, tensor.numel(), bound)).view(tensor.shape))
            offset += tensor.numel()
    if offset != 727_626:
        sys.exit(f"the model has {offset:,} parameters, not 727,626")
    initial = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = torch.from_numpy(formula(1 << 40, len(LABELS) * 3 * 32 * 32, 2.0)).view(len(LABELS), 3, 32, 32)
    y = torch.tensor(LABELS)
    logits = m(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    tensors = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    for name, p in m.named_parameters():
        tensors["gradnorm." + name] = p.grad.double().norm().float().reshape(1)
        tensors["grad." + name] = sampled(p.grad)
    opt = torch.optim.SGD(m.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        step_loss = F.cross_entropy(m(x), y)
        losses.append(step_loss.item())
        step_loss.backward()
        opt.step()
    tensors["sgd_losses"] = torch.tensor(losses)
    for name, p in m.named_parameters():
        tensors["sgd_update." + name] = sampled(p.detach() - initial[name])
    save_file(tensors, out)
    live = int((logits > 0).sum())
    print(f"loss {loss.item():.6f}, {live} of {logits.numel()} logits above zero, sgd losses {losses}")


if __name__ == "__main__":
    main(sys.argv[1])
