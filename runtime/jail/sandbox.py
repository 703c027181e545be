"""What a jail child applies to itself once its imports are done: resource limits and a seccomp filter.

- ``RLIMIT_AS`` = the idle VmSize + ``max_memory``: the decode's whole address space (heap, mappings,
  thread stacks) is bounded; an allocation past it fails (MemoryError) instead of growing the board.
- ``RLIMIT_CORE`` 0 (no core files), ``RLIMIT_FSIZE`` 0 (no file writes; Python ignores SIGXFSZ, so a
  write fails with EFBIG).
- ``RLIMIT_CPU`` per task (``set_task_cpu``): soft = CPU used so far + the task's seconds, hard left as
  is so the next task can raise soft again; SIGXCPU's default action ends the child.
- seccomp-BPF (``prctl(PR_SET_NO_NEW_PRIVS)`` then ``seccomp(SET_MODE_FILTER, TSYNC)``; ``prctl(
  PR_SET_SECCOMP)`` where the seccomp syscall is missing): socket, socketpair, execve, execveat,
  io_uring (which can open sockets itself), ptrace, process_vm_readv/writev and kill fail with EPERM;
  syscalls of another ABI (x32, i386 on x86_64) too. x86_64 and aarch64 only; elsewhere, and where the
  kernel or an emulator (qemu-user) refuses filters, the child carries on without it and says why.
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

__all__ = ["SandboxState", "apply", "set_task_cpu", "vm_size", "vm_rss", "socket_errno", "BLOCKED_SYSCALLS"]

# The syscalls refused, by architecture: (audit arch, {name: number}).
BLOCKED_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "execve": 59, "execveat": 322, "ptrace": 101,
                            "kill": 62, "process_vm_readv": 310, "process_vm_writev": 311,
                            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "execve": 221, "execveat": 281, "ptrace": 117,
                             "kill": 129, "process_vm_readv": 270, "process_vm_writev": 271,
                             "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
}
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
_RET_K = 0x06  # BPF_RET | BPF_K
_OFFSET_NR, _OFFSET_ARCH = 0, 4  # struct seccomp_data


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


def _program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter: a foreign ABI or a blocked syscall → EPERM; anything else allowed."""
    audit_arch, numbers = BLOCKED_SYSCALLS[arch]
    deny = _SECCOMP_RET_ERRNO | errno.EPERM
    blocked = sorted(numbers.values())
    prog = [(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
            (_JEQ_K, 1, 0, audit_arch),
            (_RET_K, 0, 0, deny),
            (_LD_W_ABS, 0, 0, _OFFSET_NR)]
    if arch == "x86_64":  # x32 syscalls share the arch value and set this bit
        prog += [(_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_RET_K, 0, 0, deny)]
    for k, number in enumerate(blocked):
        to_deny = len(blocked) - k  # jump over the remaining comparisons and the allow
        prog.append((_JEQ_K, to_deny, 0, number))
    prog += [(_RET_K, 0, 0, _SECCOMP_RET_ALLOW), (_RET_K, 0, 0, deny)]
    return prog


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
    program = _program(arch)
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
