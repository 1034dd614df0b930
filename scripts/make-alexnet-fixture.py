"""Writes the PyTorch side of AlexNet's numeric test (Tests/Fixtures/alexnet-step.safetensors).

torchvision.models.alexnet(num_classes=10), dropout off, one forward and backward of the mean
cross-entropy on a batch of 2 images of 3×64×64 with labels [3, 7]. Nothing large is committed:
the weights and the images come from a formula that the test computes too. Element i of the flat
parameter vector (the tensors in state_dict order, each flattened row-major) is
bound × (2u − 1), with u = splitmix64(i) >> 11 / 2^53 and bound = 1/√(fan-in of the layer's
weight), PyTorch's default range; element i of the images (NCHW) is 2 × (2u − 1) with
u from splitmix64(2^40 + i).

Saves (about 10 KB): `logits` (2, 10); `loss` (1); for every parameter tensor, `gradnorm.<name>`
(1), the L2 norm of its gradient, and `grad.<name>` (m = min(64, count)), its gradient at the
flat indices ⌊k × count / m⌋, k = 0…m−1.

Usage: python scripts/make-alexnet-fixture.py OUT.safetensors
Needs: torch, torchvision, safetensors, numpy.
"""
import math, sys, numpy as np, torch, torch.nn.functional as F, torchvision
from safetensors.torch import save_file

M64 = np.uint64


def formula(start, count, scale):
    """scale × (2u − 1) for flat indices start…start+count−1, in float64, rounded once to float32."""
    out = np.empty(count, dtype=np.float32)
    for lo in range(0, count, 1 << 22):  # in pieces: the largest tensor has 37.7 M elements
        z = np.arange(start + lo, start + min(count, lo + (1 << 22)), dtype=np.uint64) + M64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> M64(30))) * M64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> M64(27))) * M64(0x94D049BB133111EB)
        z ^= z >> M64(31)
        u = (z >> M64(11)).astype(np.float64) * 2.0 ** -53
        out[lo:lo + len(u)] = (scale * (2 * u - 1)).astype(np.float32)
    return out


def main(out):
    torch.set_num_threads(1)
    np.seterr(over="ignore")  # splitmix64 multiplies modulo 2^64
    m = torchvision.models.alexnet(num_classes=10)
    for mod in m.classifier:
        if isinstance(mod, torch.nn.Dropout): mod.p = 0.0
    state, offset, bound = m.state_dict(), 0, None
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith(".weight"):
                bound = 1.0 / math.sqrt(math.prod(tensor.shape[1:]))
            tensor.copy_(torch.from_numpy(formula(offset, tensor.numel(), bound)).view(tensor.shape))
            offset += tensor.numel()
    if offset != 57_044_810:
        sys.exit(f"torchvision's AlexNet has {offset:,} parameters, not 57,044,810")
    x = torch.from_numpy(formula(1 << 40, 2 * 3 * 64 * 64, 2.0)).view(2, 3, 64, 64)
    m.train()
    logits = m(x)
    loss = F.cross_entropy(logits, torch.tensor([3, 7]))
    loss.backward()
    tensors = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    for name, p in m.named_parameters():
        g = p.grad.reshape(-1)
        k = min(64, g.numel())
        tensors["gradnorm." + name] = g.double().norm().float().reshape(1)
        tensors["grad." + name] = g[[i * g.numel() // k for i in range(k)]].contiguous()
    save_file(tensors, out)
    print(f"loss {loss.item():.6f}, logits {logits.detach().numpy().round(4).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
