#!/usr/bin/env python3
"""Build a single-layer container image as a docker-archive tar (for `ctr image import`),
without a container engine or registry. The output is reproducible: same inputs, same image ID.

  mkimage.py --tag shardmesh.local/demo:dev --out demo.tar \
      --binary target/debug/shardmesh-demo --nonroot

  mkimage.py --tag shardmesh.local/busybox:1 --out bb.tar \
      --file /bin/busybox:/bin/busybox --symlink busybox:/bin/sh --cmd sh

Options:
  --binary SRC        add SRC as /usr/local/bin/<name> plus every shared library `ldd` lists
                      for it (and the dynamic loader); entrypoint defaults to that path
  --file SRC:DEST     add a host file at DEST (mode kept)
  --symlink TGT:DEST  add a symlink DEST -> TGT
  --dir DEST          add an empty directory (mode 0755; /tmp gets 1777)
  --nonroot           add /etc/passwd, /etc/group with root and nonroot (65532) and run as
                      65532:65532 unless --user is given
  --user U            image config User
  --entrypoint ARG    (repeatable) entrypoint argv
  --cmd ARG           (repeatable) cmd argv
  --env K=V           (repeatable) extra environment

Prints one JSON line: {"tag", "out", "id"} where id is the image config digest.
"""
import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

NONROOT = 65532
PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"


class Layer:
    """Collects entries by absolute path and writes them as a deterministic tar."""

    def __init__(self):
        self.entries = {}  # path -> ("dir", mode) | ("file", src, mode) | ("link", target) | ("data", bytes, mode)

    def _parents(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", 0o755))

    def add_dir(self, path, mode=0o755):
        self._parents(path)
        self.entries[path] = ("dir", mode)

    def add_file(self, src, dest):
        st = os.stat(src)  # follows symlinks: the image gets the real content
        self._parents(dest)
        self.entries[dest] = ("file", src, st.st_mode & 0o7777)

    def add_data(self, dest, data, mode=0o644):
        self._parents(dest)
        self.entries[dest] = ("data", data, mode)

    def add_symlink(self, target, dest):
        self._parents(dest)
        self.entries[dest] = ("link", target)

    def write(self, fileobj):
        with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as t:
            for path in sorted(self.entries):
                e = self.entries[path]
                ti = tarfile.TarInfo(path.lstrip("/"))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.mtime = 0
                if e[0] == "dir":
                    ti.type, ti.mode = tarfile.DIRTYPE, e[1]
                    t.addfile(ti)
                elif e[0] == "link":
                    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e[1], 0o777
                    t.addfile(ti)
                elif e[0] == "data":
                    ti.size, ti.mode = len(e[1]), e[2]
                    t.addfile(ti, io.BytesIO(e[1]))
                else:
                    ti.size, ti.mode = os.path.getsize(e[1]), e[2]
                    with open(e[1], "rb") as f:
                        t.addfile(ti, f)


def shared_libs(binary):
    """Absolute paths of the shared objects `binary` loads (empty for a static binary)."""
    res = subprocess.run(["ldd", binary], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if res.returncode != 0:
        sys.exit(f"mkimage: ldd {binary} failed: {text.strip()}")
    libs = []
    for line in text.splitlines():
        if "not found" in line:
            sys.exit(f"mkimage: {binary} needs a library that is not installed: {line.strip()}")
        m = re.search(r"(/\S+) \(0x[0-9a-f]+\)", line)
        if m:
            libs.append(m.group(1))
    return libs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--symlink", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--nonroot", action="store_true")
    ap.add_argument("--user")
    ap.add_argument("--entrypoint", action="append")
    ap.add_argument("--cmd", action="append")
    ap.add_argument("--env", action="append", default=[])
    a = ap.parse_args()
    if ":" not in a.tag.rsplit("/", 1)[-1] or a.tag.endswith(":latest"):
        sys.exit(f"mkimage: give a fixed tag (name:tag, not latest), got {a.tag!r}")

    layer = Layer()
    layer.add_dir("/tmp", 0o1777)
    entrypoint = a.entrypoint
    for b in a.binary:
        if not os.access(b, os.X_OK):
            sys.exit(f"mkimage: {b} is not an executable file")
        dest = "/usr/local/bin/" + os.path.basename(b)
        layer.add_file(b, dest)
        for lib in shared_libs(b):
            layer.add_file(lib, lib)  # same absolute path, so the loader finds it as on the host
        if entrypoint is None:
            entrypoint = [dest]
    for spec in a.file:
        src, _, dest = spec.partition(":")
        if not dest.startswith("/"):
            sys.exit(f"mkimage: --file wants SRC:/ABS/DEST, got {spec!r}")
        layer.add_file(src, dest)
    for spec in a.symlink:
        target, _, dest = spec.partition(":")
        if not dest.startswith("/"):
            sys.exit(f"mkimage: --symlink wants TARGET:/ABS/DEST, got {spec!r}")
        layer.add_symlink(target, dest)
    for d in a.dir:
        layer.add_dir(d, 0o1777 if d == "/tmp" else 0o755)
    user = a.user
    if a.nonroot:
        layer.add_data("/etc/passwd", (
            "root:x:0:0:root:/root:/sbin/nologin\n"
            f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n").encode())
        layer.add_data("/etc/group", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode())
        layer.add_dir("/home/nonroot")
        user = user or f"{NONROOT}:{NONROOT}"

    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir) as lt:
        layer.write(lt)
        lt.seek(0)
        h = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: lt.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
        diff_id = "sha256:" + h.hexdigest()
        config = {"Env": [PATH_ENV] + a.env, "WorkingDir": "/"}
        if entrypoint:
            config["Entrypoint"] = entrypoint
        if a.cmd:
            config["Cmd"] = a.cmd
        if user:
            config["User"] = user
        image = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "shardmesh e2e/scripts/mkimage.py"}],
        }
        cfg = json.dumps(image, sort_keys=True, separators=(",", ":")).encode()
        cfg_hex = hashlib.sha256(cfg).hexdigest()
        layer_name = h.hexdigest() + ".tar"
        manifest = json.dumps([{"Config": cfg_hex + ".json", "RepoTags": [a.tag], "Layers": [layer_name]}]).encode()
        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as t:
            def add(name, data):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                t.addfile(ti, io.BytesIO(data))
            add(cfg_hex + ".json", cfg)
            lt.seek(0)
            ti = tarfile.TarInfo(layer_name)
            ti.size, ti.mtime, ti.mode = size, 0, 0o644
            t.addfile(ti, lt)
            add("manifest.json", manifest)
        os.replace(tmp_out, a.out)
    print(json.dumps({"tag": a.tag, "out": a.out, "id": "sha256:" + cfg_hex}))


if __name__ == "__main__":
    main()
