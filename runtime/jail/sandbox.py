"""What a jail child applies to itself once its imports are done: resource limits and a seccomp filter.

- ``RLIMIT_AS`` = the idle VmSize + ``max_memory``: the decode's whole address space (heap, mappings,
  thread stacks) is bounded; an allocation past it fails (MemoryError) instead of growing the board.
- ``RLIMIT_CORE`` 0 (no core files), ``RLIMIT_FSIZE`` 0 (no file writes; Python ignores SIGXFSZ, so a
  write fails with EFBIG).
- ``RLIMIT_CPU`` per task (``set_task_cpu``): soft = CPU used so far + the task's seconds, hard left as
  is so the next task can raise soft again; SIGXCPU's default action ends the child.
- seccomp-BPF (``prctl(PR_SET_NO_NEW_PRIVS)`` then ``seccomp(SET_MODE_FILTER, TSYNC)``; ``prctl(
  PR_SET_SECCOMP)`` where the seccomp syscall is missing): socket, socketpair, execve, execveat,
  io_uring (which can open sockets itself), ptrace, process_vm_readv/writev and kill fail with EPERM,
  and so does everything that changes a file (RLIMIT_FSIZE alone still lets O_TRUNC empty one): open/
  openat with a write, create or truncate flag, creat, openat2, unlink, rename, mkdir, rmdir, link,
  symlink, mknod, chmod, chown, truncate, ftruncate; fork, vfork and a clone without CLONE_THREAD (a
  forked copy would escape the pool's memory count; clone3 answers ENOSYS so glibc's pthread_create
  falls back to clone); signals to anything but itself (tkill, tgkill at another process, sigqueue,
  pidfd_*); syscalls of another ABI (x32, i386 on x86_64) too.
  x86_64 and aarch64 only; elsewhere, and where the kernel or an emulator (qemu-user) refuses filters,
  the child carries on without it and says why.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import platform
import resource
import socket
import struct
from dataclasses import dataclass

__all__ = ["SandboxState", "apply", "set_task_cpu", "vm_size", "vm_rss", "socket_errno", "BLOCKED_SYSCALLS",
           "OPEN_SYSCALLS", "WRITE_FLAGS", "CLONE_SYSCALLS", "CLONE3", "CLONE_THREAD",
           "TGKILL"]

# The syscalls refused, by architecture: (audit arch, {name: number}).
BLOCKED_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "execve": 59, "execveat": 322, "ptrace": 101,
                            "kill": 62, "process_vm_readv": 310, "process_vm_writev": 311,
                            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                            "creat": 85, "openat2": 437, "unlink": 87, "unlinkat": 263, "rename": 82,
                            "renameat": 264, "renameat2": 316, "mkdir": 83, "mkdirat": 258, "rmdir": 84,
                            "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266, "mknod": 133,
                            "mknodat": 259, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
                            "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "truncate": 76,
                            "ftruncate": 77, "fork": 57, "vfork": 58, "tkill": 200, "rt_sigqueueinfo": 129,
                            "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424, "pidfd_open": 434,
                            "pidfd_getfd": 438, "process_madvise": 440}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "execve": 221, "execveat": 281, "ptrace": 117,
                             "kill": 129, "process_vm_readv": 270, "process_vm_writev": 271,
                             "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                             "openat2": 437, "unlinkat": 35, "renameat": 38, "renameat2": 276, "mkdirat": 34,
                             "linkat": 37, "symlinkat": 36, "mknodat": 33, "fchmod": 52, "fchmodat": 53,
                             "fchmodat2": 452, "fchown": 55, "fchownat": 54, "truncate": 45, "ftruncate": 46,
                             "tkill": 130, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
                             "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438,
                             "process_madvise": 440}),
}
# clone is allowed for threads only (CLONE_THREAD): a forked copy would escape the pool's memory count.
# clone3 takes its flags in memory the filter cannot read: ENOSYS makes glibc fall back to clone.
CLONE_SYSCALLS = {"x86_64": 56, "aarch64": 220}
# tgkill is allowed only at this process's own threads (raise(), pthread_kill): no signal leaves the child.
TGKILL = {"x86_64": 234, "aarch64": 131}
CLONE3 = 435
CLONE_THREAD = 0x00010000
# Syscalls allowed only without a write flag: {arch: {number: index of the flags argument}} (open, openat).
OPEN_SYSCALLS: dict[str, dict[int, int]] = {"x86_64": {2: 1, 257: 2}, "aarch64": {56: 2}}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC  # O_TMPFILE needs O_WRONLY/O_RDWR
_SECCOMP_SYSCALL = {"x86_64": 317, "aarch64": 277}


@dataclass(frozen=True)
class SandboxState:
    """What the child runs under (reported in its ready message and by ``diagnose``)."""

    as_limit: int  # bytes; -1 when unlimited
    fsize_limit: int
    idle_vm_size: int  # bytes of address space after the imports, before any task
    seccomp: str  # "on" or "unavailable: <why>"
    no_network: bool  # socket(AF_INET) refused (checked, not assumed)
    socket_errno: int  # what socket(AF_INET) failed with (0: it worked)


def apply(max_memory: int, *, seccomp: bool = True) -> SandboxState:
    """Apply every limit to this process (call once, after the imports the tasks need)."""
    idle = vm_size()
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_FSIZE, 0)
    _set_limit(resource.RLIMIT_AS, idle + max_memory)
    status = _install_filter() if seccomp else "unavailable: turned off by the parent (--no-seccomp)"
    code = socket_errno()
    return SandboxState(as_limit=resource.getrlimit(resource.RLIMIT_AS)[0],
                        fsize_limit=resource.getrlimit(resource.RLIMIT_FSIZE)[0], idle_vm_size=idle,
                        seccomp=status, no_network=code == errno.EPERM, socket_errno=code)


def set_task_cpu(cpu_s: float | None) -> int:
    """RLIMIT_CPU soft = CPU seconds used so far + ``cpu_s`` (rounded up; None: unlimited up to the hard
    limit). Returns the soft limit set (-1 when unlimited)."""
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if cpu_s is None:
        soft = hard
    else:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + max(cpu_s, 0.0)) + 0
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    return soft


def vm_size(pid: int | str = "self") -> int:
    """The process's address space in bytes (VmSize)."""
    return _status_kib(pid, "VmSize") * 1024


def vm_rss(pid: int | str = "self") -> int:
    """The process's resident memory in bytes (VmRSS)."""
    return _status_kib(pid, "VmRSS") * 1024


def socket_errno() -> int:
    """The errno socket(AF_INET) fails with here (0 when it works: the socket is closed at once)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as exc:
        return exc.errno or -1
    return 0


# ==============================================================================================
# Private helpers
# ==============================================================================================
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000
# classic BPF opcodes
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARGS = 0, 4, 16  # struct seccomp_data


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _set_limit(which: int, soft: int) -> None:
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _program(arch: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter for process ``pid``: a foreign ABI, a blocked syscall, an open with a write flag, a clone
    that is not a thread or a tgkill at another process → EPERM; clone3 → ENOSYS; anything else allowed."""
    audit_arch, numbers = BLOCKED_SYSCALLS[arch]
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to forward offsets below
    steps: list[tuple[int, str | int, str | int, int]] = [
        (_LD_W_ABS, 0, 0, _OFFSET_ARCH), (_JEQ_K, 0, "deny", audit_arch), (_LD_W_ABS, 0, 0, _OFFSET_NR)]
    if arch == "x86_64":  # x32 syscalls share the arch value and set this bit
        steps.append((_JGE_K, "deny", 0, _X32_SYSCALL_BIT))
    steps += [(_JEQ_K, "deny", 0, number) for number in sorted(set(numbers.values()))]
    opens = sorted(OPEN_SYSCALLS[arch].items())
    steps += [(_JEQ_K, f"open{number}", 0, number) for number, _ in opens]
    steps += [(_JEQ_K, "nosys", 0, CLONE3), (_JEQ_K, "clone", 0, CLONE_SYSCALLS[arch]),
              (_JEQ_K, "tgkill", 0, TGKILL[arch])]
    steps.append((_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels = {"nosys": len(steps)}
    steps.append((_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS))
    labels["clone"] = len(steps)
    steps += [(_LD_W_ABS, 0, 0, _OFFSET_ARGS), (_JSET_K, 0, "deny", CLONE_THREAD), (_RET_K, 0, 0, _SECCOMP_RET_ALLOW)]
    labels["tgkill"] = len(steps)
    steps += [(_LD_W_ABS, 0, 0, _OFFSET_ARGS), (_JEQ_K, 0, "deny", pid), (_RET_K, 0, 0, _SECCOMP_RET_ALLOW)]
    for number, arg in opens:
        labels[f"open{number}"] = len(steps)
        steps += [(_LD_W_ABS, 0, 0, _OFFSET_ARGS + 8 * arg),  # the low 32 bits (both archs are little-endian)
                  (_JSET_K, "deny", 0, WRITE_FLAGS), (_RET_K, 0, 0, _SECCOMP_RET_ALLOW)]
    labels["deny"] = len(steps)
    steps.append((_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM))

    def offset(at: int, target: str | int) -> int:
        jump = labels[target] - at - 1 if isinstance(target, str) else target
        if not 0 <= jump <= 255:
            raise ValueError(f"a seccomp jump of {jump} instructions")
        return jump

    return [(code, offset(at, jt), offset(at, jf), k) for at, (code, jt, jf, k) in enumerate(steps)]


def _install_filter() -> str:
    arch = platform.machine()
    if arch not in BLOCKED_SYSCALLS:
        return f"unavailable: no syscall table for the {arch or 'unknown'} architecture (x86_64 and aarch64 only)"
    if struct.calcsize("P") != 8:
        return "unavailable: a 32-bit Python on a 64-bit kernel"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"unavailable: libc cannot be loaded ({exc})"
    program = _program(arch, os.getpid())
    filters = (_SockFilter * len(program))(*[_SockFilter(*step) for step in program])
    fprog = _SockFprog(len(program), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"unavailable: prctl(PR_SET_NO_NEW_PRIVS) failed ({os.strerror(ctypes.get_errno())})"
    libc.syscall.restype = ctypes.c_long
    done = libc.syscall(ctypes.c_long(_SECCOMP_SYSCALL[arch]), ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
                        ctypes.c_long(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if done != 0:
        code = ctypes.get_errno()
        if code != errno.ENOSYS:
            return f"unavailable: seccomp(SET_MODE_FILTER) failed ({os.strerror(code)})"
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            return f"unavailable: prctl(PR_SET_SECCOMP) failed ({os.strerror(ctypes.get_errno())})"
    return "on"
