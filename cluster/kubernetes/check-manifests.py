"""Checks that the Kubernetes manifests give `squeezetrain join` what it reads: RANK from the
completion index, WORLD_SIZE equal to completions and parallelism, MASTER_ADDR naming pod 0 through
the headless Service the pods' subdomain names, MASTER_PORT equal to the Service's port, the key
file inside the mounted Secret, checkpoints inside the shared volume with --resume.
Prints what it checked; exits 1 naming the first disagreement."""
import sys
import yaml

docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path)) if d]
by_kind = {d["kind"]: d for d in docs}
service, job, claim = by_kind["Service"], by_kind["Job"], by_kind["PersistentVolumeClaim"]
pod = job["spec"]["template"]["spec"]
container = pod["containers"][0]
env = {e["name"]: e for e in container["env"]}
args = container["args"]
checks = []


def check(ok, what):
    if not ok:
        sys.exit(f"check-manifests: {what}: NO")
    checks.append(what)


def value(name):
    return env[name].get("value") if name in env else None


check(args[0] == "join", "the container runs `squeezetrain join`")
check(job["spec"]["completionMode"] == "Indexed", "the Job is indexed")
check(env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']",
      "RANK is the pod's completion index")
world = int(value("WORLD_SIZE"))
check(world == job["spec"]["completions"] == job["spec"]["parallelism"], f"WORLD_SIZE {world} = completions = parallelism")
batch = next(int(a.split("=", 1)[1]) for a in args if a.startswith("--batch-size="))
check(batch % world == 0, f"--batch-size {batch} divides over {world} processes")
check(service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"],
      "the Service is headless and the pods' subdomain")
check(service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}, "the Service selects the Job's pods")
check(value("MASTER_ADDR") == f"{job['metadata']['name']}-0.{service['metadata']['name']}", "MASTER_ADDR is pod 0's name")
check(int(value("MASTER_PORT")) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"],
      "MASTER_PORT is the Service's and the container's port")
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
secret = next(n for n, v in volumes.items() if "secret" in v)
check(value("SQUEEZETRAIN_KEY_FILE").startswith(mounts[secret] + "/"), "SQUEEZETRAIN_KEY_FILE is inside the mounted Secret")
shared = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
check(volumes[shared]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
      and "ReadWriteMany" in claim["spec"]["accessModes"], "the shared volume is the ReadWriteMany claim")
checkpoint_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--checkpoint-dir="))
check(checkpoint_dir.startswith(mounts[shared] + "/") and "--resume" in args, "checkpoints on the shared volume, with --resume")
check(value("CIFAR10_DIR").startswith(mounts[shared] + "/"), "CIFAR10_DIR on the shared volume")
for c in checks:
    print(f"check-manifests: {c}: yes")
