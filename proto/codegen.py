"""Generate the Python stubs of generate.proto (router <-> shard) and control.proto (router <-> launcher).

`python -m ember.proto.codegen [OUT_DIR]` writes the stubs into OUT_DIR (the
proto folder by default). The proto folder is mapped to the import path
`ember/proto`, so the stubs import each other as `ember.proto.generate_pb2`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("generate", "control")
STUBS = tuple(f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Iember/proto={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(HERE / f"{name}.proto") for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / "ember" / "proto" / name, target)
            written.append(target)
        return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in generate(out):
        print(path)
