"""What a jail child applies to itself (runtime/jail/sandbox.py), checked in real processes: no
network, no exec, no file writes, a bounded address space and CPU time; the seccomp program checked
instruction by instruction for both architectures; where seccomp is unavailable the child says why."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rksmolvlm.runtime.jail import sandbox

PROBE = textwrap.dedent("""
    import errno, json, os, socket
    from rksmolvlm.runtime.jail import sandbox
    state = sandbox.apply(64 << 20)
    out = {"seccomp": state.seccomp, "as": state.as_limit, "idle": state.idle_vm_size}
    def code(fn):
        try:
            fn()
        except OSError as exc:
            return exc.errno
        except MemoryError:
            return "MemoryError"
        return 0
    out["socket"] = code(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    out["unix_socket"] = code(lambda: socket.socket(socket.AF_UNIX))
    out["socketpair"] = code(socket.socketpair)
    out["exec"] = code(lambda: os.execv("/bin/true", ["true"]))
    out["spawn"] = code(lambda: os.posix_spawn("/bin/true", ["true"], {}))
    out["kill_parent"] = code(lambda: os.kill(os.getppid(), 0))
    existing = os.environ["JAIL_EXISTING"]
    out["create"] = code(lambda: os.open(os.environ["JAIL_FILE"], os.O_WRONLY | os.O_CREAT))
    out["truncate_open"] = code(lambda: os.open(existing, os.O_RDONLY | os.O_TRUNC))
    out["append"] = code(lambda: os.open(existing, os.O_RDWR | os.O_APPEND))
    out["truncate"] = code(lambda: os.truncate(existing, 0))
    out["unlink"] = code(lambda: os.unlink(existing))
    out["rename"] = code(lambda: os.rename(existing, existing + ".moved"))
    out["chmod"] = code(lambda: os.chmod(existing, 0o777))
    out["mkdir"] = code(lambda: os.mkdir(existing + ".d"))
    out["read"] = code(lambda: open(existing, "rb").read())
    out["fork"] = code(os.fork)
    import threading
    import ctypes, platform, signal
    libc = ctypes.CDLL(None, use_errno=True)
    tgkill = sandbox.TGKILL[platform.machine()]
    out["tgkill_parent"] = libc.syscall(tgkill, os.getppid(), os.getppid(), 0) and ctypes.get_errno()
    out["tgkill_self"] = libc.syscall(tgkill, os.getpid(), threading.get_native_id(), 0)
    box = []
    worker = threading.Thread(target=lambda: box.append(1))
    worker.start(); worker.join()
    out["thread"] = box == [1]
    out["alloc"] = code(lambda: bytearray(128 << 20))
    out["small_alloc"] = code(lambda: bytearray(16 << 20))
    print(json.dumps(out))
""")


def test_a_sandboxed_process_has_no_network_exec_writes_or_unbounded_memory(tmp_path):
    import json

    target, existing = tmp_path / "written", tmp_path / "bundle.rkllm"
    existing.write_bytes(b"weights")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JAIL_FILE": str(target), "JAIL_EXISTING": str(existing)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["alloc"] == "MemoryError" and out["small_alloc"] == 0 and out["read"] == 0 and out["thread"] is True
    assert out["as"] == out["idle"] + (64 << 20)
    if out["seccomp"] != "on":
        pytest.skip(f"seccomp here: {out['seccomp']}")
    for key in ("socket", "unix_socket", "socketpair", "exec", "spawn", "kill_parent", "create", "truncate_open",
                "append", "truncate", "unlink", "rename", "chmod", "mkdir", "fork", "tgkill_parent"):
        assert out[key] == errno.EPERM, (key, out)
    assert out["tgkill_self"] == 0
    assert not target.exists() and existing.read_bytes() == b"weights" and sorted(tmp_path.iterdir()) == [existing]


def test_the_cpu_limit_of_a_task_ends_the_process_with_sigxcpu():
    burn = "from rksmolvlm.runtime.jail import sandbox\nsandbox.set_task_cpu(1)\nwhile True: pass\n"
    done = subprocess.run([sys.executable, "-c", burn], timeout=30)
    assert done.returncode == -signal.SIGXCPU


def test_the_cpu_limit_is_per_task_the_next_task_can_raise_it_again():
    import resource

    script = ("import resource; from rksmolvlm.runtime.jail import sandbox\n"
              "a = sandbox.set_task_cpu(5); b = sandbox.set_task_cpu(50); c = sandbox.set_task_cpu(None)\n"
              "print(a, b, c, resource.getrlimit(resource.RLIMIT_CPU)[1])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    a, b, c, hard = map(int, done.stdout.split())
    assert 5 <= a <= 7 and 50 <= b <= 52 and c == hard == resource.getrlimit(resource.RLIMIT_CPU)[1]


# -- the BPF program, run by a small interpreter of the four instructions it uses --------------------


def run_filter(program, arch: int, nr: int, args: tuple[int, ...] = (0,) * 6) -> int:
    pc, acc = 0, 0
    data = {0: nr, 4: arch, **{16 + 8 * i: value & 0xFFFFFFFF for i, value in enumerate(args)}}
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = data[k]
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x35:
            pc += jt if acc >= k else jf
        elif code == 0x45:
            pc += jt if acc & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


@pytest.mark.parametrize("arch", sorted(sandbox.BLOCKED_SYSCALLS))
def test_the_filter_refuses_exactly_the_blocked_syscalls(arch):
    audit, blocked = sandbox.BLOCKED_SYSCALLS[arch]
    program = sandbox._program(arch, 4321)
    deny, allow = 0x00050000 | errno.EPERM, 0x7FFF0000
    opens = sandbox.OPEN_SYSCALLS[arch]
    for nr in set(range(0, 460)) - {sandbox.CLONE_SYSCALLS[arch], sandbox.CLONE3, sandbox.TGKILL[arch]}:  # below
        want = deny if nr in blocked.values() else allow
        assert run_filter(program, audit, nr) == want, (arch, nr)  # flags 0: O_RDONLY
    for nr, arg in opens.items():
        for flags, want in [(os.O_RDONLY | os.O_CLOEXEC, allow), (os.O_WRONLY, deny), (os.O_RDWR, deny),
                            (os.O_CREAT, deny), (os.O_TRUNC, deny), (os.O_RDONLY | os.O_DIRECTORY, allow)]:
            args = [0] * 6
            args[arg] = flags
            assert run_filter(program, audit, nr, tuple(args)) == want, (arch, nr, flags)
    assert run_filter(program, 0x40000003, 41) == deny  # i386 syscalls on x86_64 (int 0x80)
    if arch == "x86_64":
        assert run_filter(program, audit, 0x40000000 + 41) == deny  # x32
    clone = sandbox.CLONE_SYSCALLS[arch]
    assert run_filter(program, audit, clone, (0x3D0F00,)) == allow  # glibc's pthread_create flags
    assert run_filter(program, audit, clone, (0x01200011,)) == deny  # fork(): CLONE_CHILD_SETTID|… and SIGCHLD
    assert run_filter(program, audit, sandbox.CLONE3) == 0x00050000 | errno.ENOSYS
    assert run_filter(program, audit, sandbox.TGKILL[arch], (4321, 4322, 6)) == allow  # raise() in its own thread
    assert run_filter(program, audit, sandbox.TGKILL[arch], (1, 1, 9)) == deny


def test_where_seccomp_cannot_be_used_the_child_says_why(monkeypatch):
    monkeypatch.setattr(sandbox.platform, "machine", lambda: "riscv64")
    assert sandbox._install_filter().startswith("unavailable: no syscall table for the riscv64 architecture")
