"""Generate the gRPC/protobuf modules from proto/ into cacheagent/_proto (never edited by hand)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT = ROOT / "cacheagent" / "_proto"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        return 0
    newest = max(p.stat().st_mtime for p in PROTO_DIR.rglob("*.proto"))
    stamp = OUT / ".stamp"
    if stamp.exists() and stamp.stat().st_mtime >= newest and "--force" not in sys.argv:
        return 0
    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    include = str(Path(protoc.__file__).parent / "_proto")
    # Map proto/ to the virtual root cacheagent/_proto so the generated modules import each
    # other as `cacheagent._proto.csi.v1...` instead of shadowing top-level packages.
    virtual = OUT.relative_to(ROOT).as_posix()
    protos = [f"{virtual}/{p}" for p in protos]
    args = [
        "protoc",
        f"-I{virtual}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    os.chdir(ROOT)
    if protoc.main(args) != 0:
        print("gen_protos: protoc failed", file=sys.stderr)
        return 1
    # protoc writes no __init__.py; make every generated directory a regular package.
    for d in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    stamp.touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
