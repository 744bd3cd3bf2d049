#!/usr/bin/env python3
"""Build a single-layer container image as an OCI image-layout archive that also carries a
Docker `manifest.json`, so `ctr image import`, `docker load`, `skopeo copy oci-archive:...` and
`crane push` all take it, without a container engine or registry. The output is reproducible:
same inputs, same bytes, same image ID and manifest digest (file times are 0, entries sorted).

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
  --label K=V         (repeatable) image config label (e.g. org.opencontainers.image.version)
  --created TIME      RFC 3339 creation time recorded in the config (default the epoch; pass
                      the commit time for a reproducible, meaningful value)

Prints one JSON line: {"tag", "out", "id", "digest", "size"}: id is the image config digest
(what `ctr images ls` / `docker images --no-trunc` show), digest the manifest digest (what a
registry shows after a push of this manifest), size the archive's bytes.
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
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--created", default="1970-01-01T00:00:00Z")
    a = ap.parse_args()
    labels = {}
    for spec in a.label:
        k, sep, v = spec.partition("=")
        if not sep or not k:
            sys.exit(f"mkimage: --label wants KEY=VALUE, got {spec!r}")
        labels[k] = v
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
        if labels:
            config["Labels"] = labels
        image = {
            "architecture": "amd64",
            "os": "linux",
            "created": a.created,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": a.created, "created_by": "shardmesh e2e/scripts/mkimage.py"}],
        }
        canon = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")).encode()
        cfg = canon(image)
        cfg_hex = hashlib.sha256(cfg).hexdigest()
        layer_hex = h.hexdigest()
        manifest = canon({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + cfg_hex, "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": diff_id, "size": size}],
            **({"annotations": labels} if labels else {}),
        })
        man_hex = hashlib.sha256(manifest).hexdigest()
        repo, _, tag = a.tag.rpartition(":")
        index = canon({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + man_hex, "size": len(manifest),
                "annotations": {"io.containerd.image.name": a.tag,
                                "org.opencontainers.image.ref.name": tag},
            }],
        })
        docker = canon([{"Config": f"blobs/sha256/{cfg_hex}", "RepoTags": [a.tag],
                         "Layers": [f"blobs/sha256/{layer_hex}"]}])
        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as t:
            def entry(name, size, mode=0o644, kind=tarfile.REGTYPE):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.type = size, 0, mode, kind
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                return ti

            def add(name, data):
                t.addfile(entry(name, len(data)), io.BytesIO(data))
            t.addfile(entry("blobs", 0, 0o755, tarfile.DIRTYPE))
            t.addfile(entry("blobs/sha256", 0, 0o755, tarfile.DIRTYPE))
            blobs = {cfg_hex: cfg, man_hex: manifest, layer_hex: None}
            for hexd in sorted(blobs):
                if blobs[hexd] is None:
                    lt.seek(0)
                    t.addfile(entry(f"blobs/sha256/{hexd}", size), lt)
                else:
                    add(f"blobs/sha256/{hexd}", blobs[hexd])
            add("index.json", index)
            add("manifest.json", docker)
            add("oci-layout", canon({"imageLayoutVersion": "1.0.0"}))
        os.replace(tmp_out, a.out)
    print(json.dumps({"tag": a.tag, "out": a.out, "id": "sha256:" + cfg_hex,
                      "digest": "sha256:" + man_hex, "size": os.path.getsize(a.out)}))


if __name__ == "__main__":
    main()
