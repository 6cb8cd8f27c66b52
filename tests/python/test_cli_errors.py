"""Every way the kiln CLI fails is one line on stderr and an exit code, never a backtrace or a lost
file: outputs that cannot be written (/dev/full, a full filesystem where this process may mount a
64 KiB tmpfs) exit 1 with the old file intact; a symlink at an output's name is refused, neither
written through nor replaced; a malformed or missing model, a usage error and a bad
KILN_CACHE_MAX_MB exit 2; `kiln cache clear` that cannot remove its files exits 1 (made to fail
with chattr +i, which stops root too); a FIFO planted at a cache file's name does not hang
`kiln compile`."""
import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile

import torch

kiln = sys.argv[1]
skipped = []


def run(*args, env=None, timeout=300):
    return subprocess.run([kiln, *args], capture_output=True, text=True, env=env, timeout=timeout)


def expect_one_line(result, code, *fragments):
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    assert len(lines) == 1, (result.args, result.stderr)
    assert lines[0].startswith("kiln"), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x)
        return torch.sigmoid(h) * torch.tanh(h - 0.5) + 1.0


@contextlib.contextmanager
def tiny_filesystem(path):
    """A 64 KiB tmpfs at `path`, or None where this process may not mount one."""
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], check=True)


def fill(directory):
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            for _ in range(64):
                os.write(fd, b"f" * 4096)
    finally:
        os.close(fd)


with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(tmp, "cache"))
    model = os.path.join(tmp, "model.pt")
    torch.jit.script(Model().eval()).save(model)

    # /dev/full is a device: refused, left as it is, one line, exit 1.
    for args in (["fuse", model, "/dev/full"], ["demo", "--device", "cpu", "--save", "/dev/full"],
                 ["report", model, "--dot", "/dev/full"]):
        expect_one_line(run(*args, env=env), 1, "cannot write /dev/full")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)

    # A full filesystem: the old file keeps every byte, and no temp file is left beside it.
    with tiny_filesystem(os.path.join(tmp, "small")) as small:
        if small is None:
            skipped.append("full filesystem (cannot mount a tmpfs here)")
        else:
            out = os.path.join(small, "out")
            with open(out, "wb") as f:
                f.write(b"the previous good file")
            fill(small)
            for args in (["fuse", model, out], ["demo", "--device", "cpu", "--save", out],
                         ["report", model, "--dot", out]):
                expect_one_line(run(*args, env=env), 1, f"cannot write {out}: No space left on device")
                assert open(out, "rb").read() == b"the previous good file", args
                assert sorted(os.listdir(small)) == ["filler", "out"], os.listdir(small)
            os.remove(os.path.join(small, "filler"))
            fused = run("fuse", model, out, env=env)
            assert fused.returncode == 0, fused.stderr
            assert open(out, "rb").read(2) == b"PK"

    # A symlink at the output's name is refused: not written through, not replaced (one to
    # /proc/self/fd/1 has the shape of /dev/stdout, which root could otherwise swap for a file).
    victim, out = os.path.join(tmp, "victim"), os.path.join(tmp, "fused.pt")
    with open(victim, "w") as f:
        f.write("precious")
    for target in (victim, "/proc/self/fd/1"):
        os.symlink(target, out)
        expect_one_line(run("fuse", model, out, env=env), 1, f"cannot write {out}: a symbolic link")
        assert os.readlink(out) == target
        os.remove(out)
    assert open(victim).read() == "precious"
    assert run("fuse", model, out, env=env).returncode == 0 and open(out, "rb").read(2) == b"PK"

    # Models that cannot be loaded: one line naming the file, exit 2.
    garbage = os.path.join(tmp, "garbage.pt")
    with open(garbage, "wb") as f:
        f.write(b"not a TorchScript archive\n" * 10)
    missing = os.path.join(tmp, "missing.pt")
    for path in (garbage, missing):
        for args in (["report", path], ["fuse", path, os.path.join(tmp, "never.pt")]):
            expect_one_line(run(*args, env=env), 2, f"kiln: cannot load {path}: ")
    assert not os.path.exists(os.path.join(tmp, "never.pt"))

    # A model that fails on the given input: the error, not the TorchScript traceback.
    line = expect_one_line(run("report", model, "--input", "4,3:float32", env=env), 2)
    assert "Traceback" not in line and "shapes" in line, line

    # Usage errors: one line pointing at --help; --help itself prints the usage.
    expect_one_line(run("demo", "--bogus"), 2, "kiln: unknown option --bogus (see kiln --help)")
    expect_one_line(run(), 2, "(see kiln --help)")
    expect_one_line(run("frobnicate"), 2, "unknown verb 'frobnicate'")
    expect_one_line(run("fuse", model), 2, "fuse takes IN.pt OUT.pt")
    help_text = run("--help")
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: kiln"), help_text

    # KILN_CACHE_MAX_MB must be a whole number of MiB from 1 to 1 TiB: anything else stops every verb.
    for value in ("0", "-1", "abc", "1.5", "5MB", "99999999999999999999"):
        bad = dict(env, KILN_CACHE_MAX_MB=value)
        for args in (["env"], ["cache", "info"]):
            expect_one_line(run(*args, env=bad), 2, f"kiln: KILN_CACHE_MAX_MB='{value}': expected a whole number")
    info = json.loads(run("cache", "info", "--json", env=dict(env, KILN_CACHE_MAX_MB="64")).stdout)
    assert info["max_bytes"] == 64 << 20, info

    # cache clear that cannot remove the files: exit 1, one line naming the directory and errno.
    cache = env["KILN_CACHE_DIR"]
    os.makedirs(cache, mode=0o700, exist_ok=True)
    for i in range(3):
        open(os.path.join(cache, f"{i:032x}.kbin"), "wb").close()
    if subprocess.run(["chattr", "+i", cache], capture_output=True).returncode != 0:
        skipped.append("cache clear failure (chattr +i not possible here)")
    else:
        try:
            expect_one_line(run("cache", "clear", env=env), 1, cache, "Operation not permitted", "3 left")
        finally:
            subprocess.run(["chattr", "-i", cache], check=True)
    cleared = run("cache", "clear", "--json", env=env)
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["removed"] == 3, cleared

    # A FIFO at a cache file's name is a miss (the kernel is compiled again), not a hang.
    compile_args = ["compile", model, "--input", "8,16:float32", "--arch", "sm_90", "--json"]
    first = run(*compile_args, env=env)
    if first.returncode != 0 or not json.loads(first.stdout)["kernels"]:
        skipped.append(f"FIFO in the cache (kiln compile: {first.stderr.strip()[:200]})")
    else:
        key = json.loads(first.stdout)["kernels"][0]["cache_key"]
        entry = os.path.join(cache, key + ".kbin")
        os.remove(entry)
        os.mkfifo(entry)
        again = run(*compile_args, env=env, timeout=120)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["kernels"][0]["status"] == "compiled", again.stdout
        assert stat.S_ISREG(os.lstat(entry).st_mode)

for what in skipped:
    print(f"skipped: {what}")
print("ok")
