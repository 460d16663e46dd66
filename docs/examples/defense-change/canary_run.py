"""Send the simulator's missed attacks from 100 clients through a live sidecar, at 10 % and
after a reload at 100 %; print the refused share per cohort from the sidecar's metrics
(docs/defense-changes.md, step 5). Run it in the folder holding missed.jsonl, minilm/,
library.npz, canary-10.yaml and canary-100.yaml:

    python /path/to/bastion/docs/examples/defense-change/canary_run.py
"""
import json, os, pathlib, shutil, signal, sys, time, urllib.request
import grpc, numpy as np
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # the repository
from bastion.protos import SERVICE, codec, pb
from tests.harness import Sidecar, Upstream

texts = [json.loads(l)["text"] for l in open("missed.jsonl")][:20]
up = Upstream()
shutil.copy("canary-10.yaml", "live.yaml")
side = Sidecar(up.address, config=open("live.yaml").read().replace("minilm", os.path.abspath("minilm")).replace("library.npz", os.path.abspath("library.npz")),
               env={"BASTION_CLIENT_KEY_SECRET": "walkthrough"})
cfg = os.path.join(side._config_dir.name, "bastion.yaml")

def send():
    refused = 0
    with grpc.insecure_channel(side.address) as ch:
        call = ch.unary_unary(f"/{SERVICE}/ModelInfer")
        for k in range(100):
            for t in texts:
                r = pb.ModelInferRequest(model_name="text-classifier")
                r.inputs.add(name="prompt", datatype="BYTES", shape=[1, 1])
                codec.encode_request(r, {"prompt": np.array([[t.encode()]], dtype=object)})
                try:
                    call(r.SerializeToString(), metadata=(("x-api-key", f"client-{k}"),), timeout=30)
                except grpc.RpcError:
                    refused += 1
    return refused

def cohorts():
    text = urllib.request.urlopen(f"http://{side.admin}/metrics").read().decode()
    return [l for l in text.splitlines() if l.startswith("bastion_verdicts_total{")]

def version():
    return json.loads(urllib.request.urlopen(f"http://{side.admin}/version").read())["active"]

try:
    print("canary at 10 %:", version())
    n = send(); print(f"refused {n} of 2000 (20 missed attacks x 100 clients)")
    print("\n".join(cohorts()))
    open(cfg, "w").write(open("canary-100.yaml").read().replace("minilm", os.path.abspath("minilm")).replace("library.npz", os.path.abspath("library.npz")))
    side.proc.popen.send_signal(signal.SIGHUP)
    for _ in range(100):
        time.sleep(0.3)
        if json.loads(urllib.request.urlopen(f"http://{side.admin}/version").read())["history"][-1]["result"] != "initial":
            break
    print("\nwidened to 100 % (hot reload):", version())
    n = send(); print(f"refused {n} of 2000")
    print("\n".join(cohorts()))
finally:
    side.stop(); up.stop()
