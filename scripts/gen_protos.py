"""Regenerate the committed protobuf/gRPC code in protos/ from protos/*.proto.

Run from the repository root: `python scripts/gen_protos.py`. Output is deterministic for a given
grpcio-tools version (recorded in protos/GENERATED_BY).

The generated modules register their descriptors in Bastion's own descriptor pool instead of
protobuf's default one: tritonclient (and Triton's or KServe's own stubs) define the same
`inference.*` symbols, and two definitions of one symbol in the default pool make the second
import fail. A private pool lets the sidecar, its tests and a user's client share a process.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def main() -> int:
    import grpc_tools

    with tempfile.TemporaryDirectory() as tmp:
        pkg = pathlib.Path(tmp) / "bastion" / "protos"
        pkg.mkdir(parents=True)
        protos = sorted(PROTO_DIR.glob("*.proto"))
        for proto in protos:
            shutil.copy(proto, pkg / proto.name)
        include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"-I{include}",
               f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        cmd += [f"bastion/protos/{p.name}" for p in protos]
        subprocess.run(cmd, check=True)
        for generated in sorted(pkg.glob("*_pb2*.py*")):
            text = generated.read_text()
            if generated.name.endswith("_pb2.py"):
                text = text.replace(
                    "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                    "from bastion.protos._pool import POOL as _bastion_pool\n")
                text = re.sub(r"_descriptor_pool\.Default\(\)", "_bastion_pool", text)
            (PROTO_DIR / generated.name).write_text(text)
    version = subprocess.run([sys.executable, "-m", "pip", "show", "grpcio-tools"],
                             capture_output=True, text=True).stdout
    tools_version = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                          if line.startswith("Version:")), "unknown")
    (PROTO_DIR / "GENERATED_BY").write_text(
        f"python scripts/gen_protos.py  (grpcio-tools {tools_version})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
