"""torchrun's answer to a lost worker, measured: restart every process from the last checkpoint.

The model, data and DDP set-up of ../shared/peers/pytorch_ddp.py (which spawns its own processes and
so cannot run under torchrun), made a torchrun script: rank 0 checkpoints every EVERY steps into DIR
and logs each step's wall-clock time to DIR/steps.jsonl; a restarted attempt
(TORCHELASTIC_RESTART_COUNT > 0) resumes from the checkpoint. Then SIGKILL one worker:

    /tmp/pt/bin/torchrun --nproc-per-node 3 --max-restarts 1 scripts/torchrun-restart.py DIR 150 10 &
    # once DIR/steps.jsonl reaches step 25: kill -9 the process with RANK=2 in its environment

`--measure DIR STEP` (run beside it) does the kill and prints the stall (SIGKILL to the next step
logged) and the steps trained again, as `squeezetrain bench cluster --kill-worker-at` does.
"""
import json, os, signal, sys, time


def train(directory, steps, every):
    import torch, torch.nn as nn, torchvision, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1); torch.manual_seed(0)
    dist.init_process_group("gloo")
    model = torchvision.models.squeezenet1_1(num_classes=10)
    model.features[0] = nn.Conv2d(3, 64, 3, stride=1, padding=1)
    m = DDP(model); opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    checkpoint, start = os.path.join(directory, "checkpoint.pt"), 0
    if restart > 0 and os.path.exists(checkpoint):
        state = torch.load(checkpoint)
        m.module.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"]); start = state["step"]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))  # 8 per worker: squeezetrain's --batch-size 24 over 3
    loss = nn.CrossEntropyLoss()
    for step in range(start, steps):
        opt.zero_grad(); loss(m(x), y).backward(); opt.step()
        if rank != 0:
            continue
        if (step + 1) % every == 0:
            torch.save({"model": m.module.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
        with open(os.path.join(directory, "steps.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "restart": restart}) + "\n")
    dist.destroy_process_group()


def measure(directory, at):
    log = os.path.join(directory, "steps.jsonl")
    def lines():
        try:
            with open(log) as f:
                return [json.loads(l) for l in f if l.endswith("\n")]
        except FileNotFoundError:
            return []
    while not any(l["step"] >= at for l in lines()):
        time.sleep(0.01)
    before = max(l["step"] for l in lines())
    victim = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _rank(p) == "2")
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    while True:
        after = [l for l in lines() if l["restart"] > 0]
        if after:
            seen = time.time()
            print(f"torchrun --max-restarts: worker 2 SIGKILLed once step {before} was logged; every process restarted")
            print(f"  steps trained again: {max(0, before + 1 - after[0]['step'])} (the run went on from step {after[0]['step']})")
            print(f"  stall, SIGKILL -> next step logged: {seen - killed:.2f} s")
            return
        time.sleep(0.01)


def _rank(pid):
    """RANK in the environment of a process running this script, else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"torchrun-restart.py" not in f.read() or pid == str(os.getpid()):
                return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        return env.get(b"RANK", b"").decode() or None
    except OSError:
        return None


if __name__ == "__main__":
    if sys.argv[1] == "--measure":
        measure(sys.argv[2], int(sys.argv[3]))
    else:
        train(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
