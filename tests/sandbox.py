"""The system-call sandbox of config/blobferry.service, applied without systemd.

systemd is not running here, so the unit's filters are rebuilt from the unit file with
libseccomp, as systemd builds them: ``SystemCallFilter=`` lines (groups expanded by
``systemd-analyze syscall-filter``, ``~`` lines taken away), whose other system calls
kill the process with SIGSYS unless ``SystemCallErrorNumber=`` names an errno;
``MemoryDenyWriteExecute=`` (no memory both writable and executable) and
``RestrictAddressFamilies=``, both answered with an errno. A daemon that makes a call
the unit forbids dies here as it would under systemd. The rest of the unit (users,
mounts, capabilities) is not modelled.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
CMP_EQ, CMP_GT, CMP_MASKED_EQ = 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_MAX = 46


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def directives(unit: Path) -> list[tuple[str, str]]:
    """(key, value) of the unit's [Service] section, in order."""
    out, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.append((key, value))
    return out


def _expand(names: list[str], seen: dict[str, set[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name not in seen:
            text = subprocess.run(
                ["systemd-analyze", "syscall-filter", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            members = [
                w.split()[0]
                for w in text.splitlines()[1:]
                if w.strip() and not w.strip().startswith("#")
            ]
            seen[name] = set()  # a group naming itself must not loop
            seen[name] = _expand(members, seen)
        calls |= seen[name]
    return calls


@dataclass(frozen=True)
class Sandbox:
    allowed: frozenset[str] | None  # None: every call but ``denied``
    denied: frozenset[str]
    refusal: int | None  # errno for a forbidden call; None: SIGSYS
    deny_write_execute: bool
    families: frozenset[int] | None  # socket families allowed; None: all

    @classmethod
    def of_unit(cls, unit: Path) -> Sandbox:
        allowed: set[str] | None = None
        denied: set[str] = set()
        refusal = None
        mdwe = False
        families: set[int] | None = None
        groups: dict[str, set[str]] = {}
        for key, value in directives(unit):
            if key == "SystemCallFilter":
                deny = value.startswith("~")
                calls = _expand(value.lstrip("~").split(), groups)
                if deny and allowed is None:
                    denied |= calls
                elif deny:
                    allowed = (allowed or set()) - calls
                elif allowed is None and not denied:
                    allowed = calls
                elif allowed is None:
                    denied -= calls
                else:
                    allowed |= calls
            elif key == "SystemCallErrorNumber":
                refusal = getattr(errno, value.strip())
            elif key == "MemoryDenyWriteExecute":
                mdwe = value.strip() == "yes"
            elif key == "RestrictAddressFamilies":
                families = {getattr(socket, f) for f in value.split()}
        return cls(
            frozenset(allowed) if allowed is not None else None,
            frozenset(denied),
            refusal,
            mdwe,
            frozenset(families) if families is not None else None,
        )

    def enter(self) -> None:
        """Load the filters into this process (and so whatever it execs next): call
        it in a child between fork and exec. Sets no_new_privs, as systemd does."""
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        forbidden = KILL_PROCESS if self.refusal is None else _errno_action(self.refusal)

        def rule(ctx: int, action: int, call: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(call.encode())
            if nr < 0:
                return  # not a system call of this architecture
            array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
            lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)

        def load(ctx: int) -> None:
            if lib.seccomp_load(ctx) != 0:
                raise OSError(ctypes.get_errno(), "seccomp_load failed")

        # Like systemd, one filter per directive; the kernel obeys the strictest answer.
        if self.deny_write_execute:
            ctx = lib.seccomp_init(ALLOW)
            eperm = _errno_action(errno.EPERM)
            wx = PROT_WRITE | PROT_EXEC
            rule(ctx, eperm, "mmap", (2, CMP_MASKED_EQ, wx, wx))
            rule(ctx, eperm, "mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            rule(ctx, eperm, "pkey_mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            rule(ctx, eperm, "shmat", (2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
            load(ctx)
        if self.families is not None:
            ctx = lib.seccomp_init(ALLOW)
            nope = _errno_action(errno.EAFNOSUPPORT)
            for family in range(AF_MAX + 1):
                if family not in self.families:
                    rule(ctx, nope, "socket", (0, CMP_EQ, family, 0))
            rule(ctx, nope, "socket", (0, CMP_GT, AF_MAX, 0))
            load(ctx)
        # The list of allowed calls last: it may not allow seccomp() itself.
        if self.allowed is not None:
            ctx = lib.seccomp_init(forbidden)
            for call in sorted(self.allowed):
                rule(ctx, ALLOW, call)
            load(ctx)
        elif self.denied:
            ctx = lib.seccomp_init(ALLOW)
            for call in sorted(self.denied):
                rule(ctx, forbidden, call)
            load(ctx)
