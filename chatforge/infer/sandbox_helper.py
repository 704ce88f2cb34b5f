"""The sandbox's helper process: a warm interpreter that forks one confined child per tool call.

`infer/sandbox.py` starts this file as a script (`python -I -S`, stdlib only, a clean environment)
and talks to it over one SOCK_SEQPACKET socket (its fd number is the last argument): a request is one message (header + code), a
response one message. Three kinds of process take part:

- the helper (this loop): preloads the modules a call may need, enters its own network, IPC, UTS
  and mount namespaces (plus a user namespace when not root, which is what lets an ordinary user
  create the others) and then only ever receives a request into a buffer, forks, and zeroes the
  buffer. It never decodes a request, so a child forked later finds no other call's code in memory.
- the keeper (one per call, trusted, unconfined): enters a new PID and mount namespace, mounts a
  fresh tmpfs (sized to the call's file limit) as the call's working folder, forks the runner,
  enforces the wall-clock deadline and the output cap, checks the runner's result and sends the
  response. It dies with the helper (PDEATHSIG), and the runner dies with it.
- the runner (one per call, confined): PID 1 of its namespace, so it sees no other process and when
  it ends every process it could have made ends too. Before the code runs it takes the limits
  (address space, CPU, file size, open files), drops to `nobody` when the helper is root (or drops
  every capability inside the user namespace), and then lets the kernel hold the line:
    * Landlock: read the standard library, read and write the call's tmpfs, nothing else (no /proc,
      no /etc, no home, no /tmp); TCP bind/connect and signals/abstract sockets outside it refused
      where the kernel's Landlock is new enough (ABI 4 and 6).
    * seccomp-bpf: no exec, no fork/clone (so no threads either), no sockets, no ptrace or process
      memory access, no pidfds, no namespace or mount changes, no io_uring/bpf/perf, no setuid
      family, no chmod/chown/xattr/utime by path (which Landlock does not mediate), no kernel
      modules or keyrings; everything else is allowed, so CPython runs unmodified.
    * no_new_privs, a clean environment, fds 0-3 only (/dev/null, the output pipe twice, the result
      pipe); the socket to the server is closed before any code runs.

The verdict: the runner writes the request's nonce, the outcome and the value or error to the result
pipe after the code returns, with functions it took before the code ran; the keeper accepts it only
with the nonce, which the code never gets as a name (it lives in the runner's frame, not in the
code's globals, its `__main__` or any module). So `report()`-style forgeries, an early `os._exit(0)`
or `sys.exit(0)`, and patching `json`/`os.write` all end as failures. What remains: the code shares one process
with the runner, so a program that walks the interpreter's objects (gc, frames) can find the nonce,
and a program can return objects that compare equal to anything; no in-process check can rule that
out. The kernel boundary is what protects the machine; a grade stays a grade of code that cooperates.
"""

import builtins
import ctypes
import io
import json
import os
import platform
import select
import signal
import socket
import struct
import sys
import time
import traceback
import types

# Modules a tool call commonly needs (calculator, HumanEval): imported here once, so each call
# starts fast and they work even where the runner (as `nobody`) cannot read the standard library.
PRELOAD = ("math", "cmath", "re", "json", "random", "statistics", "fractions", "decimal", "itertools",
           "functools", "collections", "collections.abc", "string", "datetime", "time", "calendar", "heapq",
           "bisect", "operator", "copy", "typing", "dataclasses", "enum", "textwrap", "unicodedata",
           "hashlib", "array", "numbers", "struct", "base64", "binascii", "difflib", "pprint", "ast",
           "traceback", "io", "csv", "string", "keyword", "locale", "weakref", "contextlib", "abc",
           "inspect", "tempfile", "pathlib", "shutil", "glob", "fnmatch", "zlib", "resource", "sysconfig", "fcntl", "threading", "queue", "mmap")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
NOBODY = 65534
DISK_BYTES = 64 << 20  # each call's tmpfs: what its files may take in all

# ---- seccomp: syscalls refused with EPERM ----------------------------------------------------------

DENIED = ("clone clone3 fork vfork execve execveat socket socketpair connect bind listen accept accept4 "
          "ptrace process_vm_readv process_vm_writev kcmp pidfd_open pidfd_getfd pidfd_send_signal "
          "perf_event_open bpf userfaultfd unshare setns mount umount2 pivot_root chroot move_mount open_tree "
          "open_tree_attr fsopen fsconfig fsmount fspick mount_setattr init_module finit_module delete_module "
          "kexec_load kexec_file_load reboot swapon swapoff acct syslog quotactl quotactl_fd lookup_dcookie "
          "iopl ioperm settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname vhangup "
          "personality add_key request_key keyctl io_uring_setup io_uring_enter io_uring_register "
          "open_by_handle_at name_to_handle_at chmod fchmodat fchmodat2 chown lchown fchownat utime utimes "
          "futimesat utimensat setxattr lsetxattr setxattrat removexattr lremovexattr removexattrat mknod "
          "mknodat setuid setgid setreuid setregid setresuid setresgid setgroups setfsuid setfsgid capset "
          "mbind migrate_pages move_pages fanotify_init memfd_secret uselib ustat sysfs nfsservctl "
          "modify_ldt").split()

# numbers from the kernel's unistd tables; aarch64 has only the *at forms of the old path calls
SYSCALLS = {
    "x86_64": dict(
        clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322, socket=41, socketpair=53, connect=42,
        bind=49, listen=50, accept=43, accept4=288, ptrace=101, process_vm_readv=310, process_vm_writev=311,
        kcmp=312, pidfd_open=434, pidfd_getfd=438, pidfd_send_signal=424, perf_event_open=298, bpf=321,
        userfaultfd=323, unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
        move_mount=429, open_tree=428, open_tree_attr=467, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, init_module=175, finit_module=313, delete_module=176, kexec_load=246,
        kexec_file_load=320, reboot=169, swapon=167, swapoff=168, acct=163, syslog=103, quotactl=179,
        quotactl_fd=443, lookup_dcookie=212, iopl=172, ioperm=173, settimeofday=164, clock_settime=227,
        clock_adjtime=305, adjtimex=159, sethostname=170, setdomainname=171, vhangup=153, personality=135,
        add_key=248, request_key=249, keyctl=250, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_by_handle_at=304, name_to_handle_at=303, chmod=90, fchmodat=268,
        fchmodat2=452, chown=92, lchown=94, fchownat=260, utime=132, utimes=235, futimesat=261, utimensat=280,
        setxattr=188, lsetxattr=189, setxattrat=463, removexattr=197, lremovexattr=198, removexattrat=466,
        mknod=133, mknodat=259, setuid=105, setgid=106, setreuid=113, setregid=114, setresuid=117,
        setresgid=119, setgroups=116, setfsuid=122, setfsgid=123, capset=126, mbind=237, migrate_pages=256,
        move_pages=279, fanotify_init=300, memfd_secret=447, uselib=134, ustat=136, sysfs=139,
        nfsservctl=180, modify_ldt=154),
    "aarch64": dict(
        clone=220, clone3=435, execve=221, execveat=281, socket=198, socketpair=199, connect=203, bind=200,
        listen=201, accept=202, accept4=242, ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272,
        pidfd_open=434, pidfd_getfd=438, pidfd_send_signal=424, perf_event_open=241, bpf=280, userfaultfd=282,
        unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51, move_mount=429, open_tree=428,
        open_tree_attr=467, fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
        init_module=105, finit_module=273, delete_module=106, kexec_load=104, kexec_file_load=294, reboot=142,
        swapon=224, swapoff=225, acct=89, syslog=116, quotactl=60, quotactl_fd=443, lookup_dcookie=18,
        settimeofday=170, clock_settime=112, clock_adjtime=266, adjtimex=171, sethostname=161,
        setdomainname=162, vhangup=58, personality=92, add_key=217, request_key=218, keyctl=219,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_by_handle_at=265,
        name_to_handle_at=264, fchmodat=53, fchmodat2=452, fchownat=54, utimensat=88, setxattr=5, lsetxattr=6,
        setxattrat=463, removexattr=14, lremovexattr=15, removexattrat=466, mknodat=33, setuid=146, setgid=144,
        setreuid=145, setregid=143, setresuid=147, setresgid=149, setgroups=159, setfsuid=151, setfsgid=152,
        capset=91, mbind=235, migrate_pages=238, move_pages=239, fanotify_init=262, memfd_secret=447,
        nfsservctl=42),
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def seccomp_program(arch: str) -> bytes:
    """A classic-BPF filter: wrong architecture -> kill; x32 calls and DENIED -> EPERM; rest -> allow."""
    def insn(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)
    LD_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, KILL, EPERM = 0x7FFF0000, 0x80000000, 0x00050000 | 1
    numbers = sorted({SYSCALLS[arch][name] for name in DENIED if name in SYSCALLS[arch]})
    prog = [insn(LD_ABS, 0, 0, 4), insn(JEQ, 1, 0, AUDIT_ARCH[arch]), insn(RET, 0, 0, KILL),
            insn(LD_ABS, 0, 0, 0)]
    n = len(numbers) + (1 if arch == "x86_64" else 0)
    if arch == "x86_64":  # the x32 ABI reuses the same kernel with numbers above 2^30
        prog.append(insn(JGE, n, 0, 0x40000000))
    for i, nr in enumerate(numbers):
        prog.append(insn(JEQ, len(numbers) - i, 0, nr))  # jump over the remaining checks and ALLOW
    prog += [insn(RET, 0, 0, ALLOW), insn(RET, 0, 0, EPERM)]
    return b"".join(prog)


def install_seccomp(program: bytes) -> None:
    filt = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(filt))  # struct sock_fprog
    buf = ctypes.create_string_buffer(fprog)
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, buf, 0, 0), "seccomp")


# ---- Landlock --------------------------------------------------------------------------------------

LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446  # the same numbers on every architecture
READ_FILE, READ_DIR = 1 << 2, 1 << 3
WORK_RIGHTS = (1 << 1) | READ_FILE | READ_DIR | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 12) \
    | (1 << 13) | (1 << 14)  # write, read, remove dir/file, make dir/reg/fifo/sym, refer, truncate


def landlock_abi() -> int:
    return libc.syscall(LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))


def landlock_fs_rights(abi: int) -> int:
    bits = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)  # REFER (2), TRUNCATE (3), IOCTL_DEV (5)
    return (1 << bits) - 1


def landlock_ruleset(abi: int, read_dirs: list, work_dir: str) -> int:
    """A ruleset fd: read `read_dirs`, read and write `work_dir`. Built while the folders can still be
    opened (before dropping to `nobody`), enforced later by `landlock_restrict`."""
    handled = landlock_fs_rights(abi)
    attr = struct.pack("QQQ", handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # fs, tcp, scope
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    buf = ctypes.create_string_buffer(attr)
    ruleset = libc.syscall(LL_CREATE, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    check(ruleset, "landlock_create_ruleset")
    for path, rights in [(d, READ_FILE | READ_DIR) for d in read_dirs] + [(work_dir, WORK_RIGHTS & handled)]:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd))
            check(libc.syscall(LL_ADD_RULE, ruleset, 1, rule, ctypes.c_uint32(0)), f"landlock rule {path}")
        finally:
            os.close(fd)
    return ruleset


def landlock_restrict(ruleset: int) -> None:
    check(libc.syscall(LL_RESTRICT, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)


def die_with_parent() -> None:
    """SIGKILL when the parent ends (Linux; the unconfined mode elsewhere goes without)."""
    if hasattr(libc, "prctl"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop_capabilities() -> None:
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(24)  # two zeroed __user_cap_data_struct
    check(libc.syscall(SYSCALLS[ARCH]["capset"], header, data), "capset")


ARCH = platform.machine()

# ---- the helper ------------------------------------------------------------------------------------


def enter_namespaces() -> None:
    """Network, IPC, UTS and mount namespaces for the helper and everything it forks."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER  # what lets an ordinary user create the others
    check(libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    # mounts made by the keepers must never reach the host's mount table
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    libc.sethostname(b"sandbox", 7)


def features(mode: str) -> dict:
    """What this kernel offers; `reason` says what is missing for the confined mode."""
    info = {"arch": ARCH, "landlock_abi": 0, "root": os.geteuid() == 0}
    if mode != "confined":
        return info
    if not sys.platform.startswith("linux"):
        return {**info, "reason": f"{sys.platform} is not Linux"}
    if ARCH not in SYSCALLS:
        return {**info, "reason": f"no seccomp table for the {ARCH} architecture"}
    abi = landlock_abi()
    if abi < 1:
        return {**info, "reason": f"the kernel offers no Landlock ({os.strerror(ctypes.get_errno())})"}
    import sysconfig
    stdlib = {os.path.realpath(sysconfig.get_path(k)) for k in ("stdlib", "platstdlib")}
    return {**info, "landlock_abi": abi, "read_dirs": sorted(d for d in stdlib if os.path.isdir(d))}


def helper_main() -> None:
    mode, mount_point, spare = sys.argv[1], sys.argv[2], int(sys.argv[4])
    sock = socket.socket(fileno=int(sys.argv[3]))
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    import gc
    gc.collect()
    gc.freeze()  # the collector never walks the preloaded objects, so forks share their pages
    info = features(mode)
    if mode == "confined" and "reason" not in info:
        try:
            enter_namespaces()
        except OSError as exc:
            info["reason"] = f"cannot create namespaces ({exc})"
    sock.send(json.dumps({"ready": "reason" not in info, **info}).encode())
    if "reason" in info:
        return
    # not PDEATHSIG: it fires when the *thread* that started us ends, and servers start us from any
    # thread; polling the parent once a second costs nothing (keepers do die with us, by PDEATHSIG)
    parent = os.getppid()
    seccomp = seccomp_program(ARCH) if mode == "confined" else b""
    taken_r, taken_w = os.pipe()
    idle: set = set()
    me = os.getpid()
    while True:
        # keep `spare` keepers, each with its runner already confined, blocked on the socket: a call
        # then costs no fork, and the refill happens while it runs
        while len(idle) < spare:
            pid = os.fork()
            if pid == 0:
                os.close(taken_r)
                keeper(sock, taken_w, mode, info, mount_point, seccomp, me)
            idle.add(pid)
        ready, _, _ = select.select([taken_r], [], [], 1.0)
        if os.getppid() != parent:
            return
        if ready:
            data = os.read(taken_r, 4096)
            for i in range(0, len(data) - 3, 4):
                idle.discard(int.from_bytes(data[i:i + 4], "little"))
        while True:  # reap finished keepers; one that died idle is replaced
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            idle.discard(pid)


# ---- the keeper ------------------------------------------------------------------------------------


def keeper(sock, taken_w: int, mode: str, info: dict, mount_point: str, seccomp: bytes, helper_pid: int):
    """Prepare a confined runner, take one request off the socket, supervise it, answer, exit."""
    code = 1
    try:
        die_with_parent()
        if os.getppid() != helper_pid:
            os._exit(1)
        work = prepare_folder(mode, info, mount_point)
        runner_pid, pipes = start_runner(mode, info, work, seccomp)
        request = sock.recv(1 << 18)
        if not request:
            os._exit(0)
        os.write(taken_w, os.getpid().to_bytes(4, "little"))
        hlen = int.from_bytes(request[:4], "little")
        header = json.loads(request[4:4 + hlen])
        try:
            response = supervise(header, request, runner_pid, pipes)
        except Exception as exc:
            response = failure(f"RuntimeError: the sandbox could not run the call ({exc})")
        if mode != "confined":
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        response["id"] = header["id"]
        sock.send(json.dumps(response).encode())
        code = 0
    finally:
        os._exit(code)


def failure(error: str, stdout: str = "", **flags) -> dict:
    return {"ok": False, "stdout": stdout, "value": None, "error": error, **flags}


def prepare_folder(mode: str, info: dict, mount_point: str) -> str:
    """The call's working folder: a fresh tmpfs in a new mount namespace (confined), else a temp dir.
    The new PID namespace taken here makes the runner forked next its PID 1."""
    if mode != "confined":
        import tempfile
        return tempfile.mkdtemp(dir=mount_point)
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
    owner = f",uid={NOBODY},gid={NOBODY}" if info["root"] else ""
    opts = f"size={DISK_BYTES},nr_inodes=4096,mode=0700{owner}".encode()
    check(libc.mount(b"tmpfs", mount_point.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts),
          "mount tmpfs")
    return mount_point


def start_runner(mode: str, info: dict, work: str, seccomp: bytes):
    """Fork the runner; it confines itself and then waits for its request on a pipe."""
    req_r, req_w = os.pipe()
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    life_r, life_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (req_w, out_r, res_r, life_w):
            os.close(fd)
        runner(mode, info, work, seccomp, req_r, out_w, res_w, life_r)
    for fd in (req_r, out_w, res_w, life_r):
        os.close(fd)
    return pid, (req_w, out_r, res_r)


def supervise(header: dict, request: bytes, pid: int, pipes) -> dict:
    """Hand the request to the runner, wait for it within the limits, and judge what it wrote."""
    req_w, out_r, res_r = pipes
    try:
        os.write(req_w, request)  # fits the pipe: requests are capped well below its 1 MiB maximum
    except BrokenPipeError:
        pass
    os.close(req_w)
    out, result, timed_out, truncated = collect(pid, out_r, res_r, header["timeout"], header["max_output"])
    kill(pid)  # it has answered or overrun; PID 1 gone takes its namespace with it
    _, status = os.waitpid(pid, 0)
    stdout = out.decode("utf-8", "replace")
    if timed_out:
        return failure(f"TimeoutError: timed out after {header['timeout']:g}s", stdout, timed_out=True,
                       truncated=truncated)
    if truncated:
        return failure(f"OutputLimitError: the program printed more than {header['max_output']} bytes and "
                       "was stopped", stdout, truncated=True)
    nonce, kind, text = (result.decode("utf-8", "replace").split("\n", 2) + ["", ""])[:3]
    if nonce != header["nonce"] or kind not in ("N", "V", "E"):
        return failure(death_reason(status), stdout)
    return {"ok": kind != "E", "stdout": stdout, "value": text if kind == "V" else None,
            "error": text if kind == "E" else None, "timed_out": text == CPU_EXHAUSTED, "truncated": False}


def collect(pid: int, out_fd: int, res_fd: int, timeout: float, max_output: int):
    """Read the output (capped) and the result until both close or the deadline passes."""
    deadline = time.monotonic() + timeout
    out, result = bytearray(), bytearray()
    open_fds = {out_fd, res_fd}
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            kill(pid)
            return bytes(out), bytes(result), True, False
        ready, _, _ = select.select(list(open_fds), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            elif fd == out_fd:
                out += chunk
                if len(out) > max_output:
                    kill(pid)
                    return bytes(out[:max_output]), bytes(result), False, True
            elif len(result) < 4 * max_output + 4096:
                result += chunk
    return bytes(out), bytes(result), False, False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)  # PID 1 of its namespace: the kernel ends everything in it
    except ProcessLookupError:
        pass


def death_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            return "RuntimeError: the program was killed (it exceeded a memory or CPU limit)"
        return f"RuntimeError: the program was killed by signal {signal.Signals(sig).name}"
    return f"RuntimeError: the program exited with code {os.waitstatus_to_exitcode(status)} without finishing"


# ---- the runner ------------------------------------------------------------------------------------


def runner(mode, info, work, seccomp, req_r, out_w, res_w, life_r):
    try:
        die_with_parent()
        if select.select([life_r], [], [], 0)[0]:
            os._exit(1)  # the keeper died before PDEATHSIG was armed
        import fcntl
        devnull = os.open("/dev/null", os.O_RDWR)
        # lift every fd above the targets first, so placing one cannot overwrite another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (devnull, out_w, out_w, res_w, req_r)]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        os.closerange(5, 1 << 16)  # the server socket among them: a call cannot answer for itself
        confine(mode, info, work, seccomp)
        request = bytearray()
        while chunk := os.read(4, 1 << 16):
            request += chunk
        os.close(4)
        if not request:
            os._exit(0)  # the keeper went away unused
        hlen = int.from_bytes(request[:4], "little")
        header = json.loads(request[4:4 + hlen])
        take_limits(header)
    except BaseException as exc:  # a half-confined process must never run the code
        os.write(2, f"sandbox setup failed: {exc}\n".encode())
        os._exit(1)
    execute(bytes(request[4 + hlen:]).decode("utf-8", "surrogatepass"), header["nonce"], header["max_output"],
            work)


def confine(mode, info, work, seccomp):
    """Everything that does not depend on the request: the kernel's boundary."""
    os.chdir(work)
    if mode != "confined":
        return
    ruleset = landlock_ruleset(info["landlock_abi"], info["read_dirs"], work)
    if info["root"]:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    else:
        drop_capabilities()  # root of the user namespace keeps no privilege either
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    landlock_restrict(ruleset)
    install_seccomp(seccomp)


def take_limits(header):
    """The request's rlimits; hard limits too, so the code cannot raise them again."""
    import resource

    def limit(kind, soft, hard=None):
        resource.setrlimit(kind, (soft, soft if hard is None else hard))
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, header["cpu_seconds"], header["cpu_seconds"] + 1)  # SIGXCPU, then SIGKILL
    limit(resource.RLIMIT_FSIZE, header["file_bytes"])
    limit(resource.RLIMIT_NOFILE, 64)
    limit(resource.RLIMIT_AS, header["memory_bytes"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing
    signal.signal(signal.SIGXCPU, _cpu_exhausted)


CPU_EXHAUSTED = "TimeoutError: CPU time limit exceeded"


def _cpu_exhausted(signum, frame):
    raise TimeoutError(CPU_EXHAUSTED.split(": ", 1)[1])


def execute(source: str, nonce: str, max_value: int, work: str) -> None:
    """Run the code as a fresh `__main__` and write the verdict.

    Everything the verdict is made with is taken before the code runs (a program that replaces
    `json.dumps` or `os.write` must not rewrite it), and it is plain str methods from then on."""
    import ast
    import random
    import tempfile

    write, close, format_exception, text_repr = os.write, os.close, traceback.format_exception_only, repr
    base_exception = BaseException
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=work, TMPDIR=work)
    tempfile.tempdir = None
    random.seed()  # a fork would otherwise repeat the helper's random state in every call
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    stdout = sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                           errors="backslashreplace")
    stderr = sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                           errors="backslashreplace", line_buffering=True)
    import mmap
    cushion = mmap.mmap(-1, 8 << 20)  # address space (untouched, so free) given back to report a memory bomb
    kind, text = "N", ""
    try:
        tree = ast.parse(source, filename="<sandbox>")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<sandbox>", "exec"), main.__dict__)
        if last is not None:
            result = eval(compile(last, "<sandbox>", "eval"), main.__dict__)
            if result is not None:
                kind, text = "V", text_repr(result)[:max_value]
    except SyntaxError as exc:
        kind, text = "E", f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except base_exception as exc:
        cushion.close()
        main.__dict__.clear()
        kind = "E"
        try:
            text = "".join(format_exception(type(exc), exc)).strip()[:max_value] or type(exc).__name__
        except base_exception:
            text = "Exception"
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except base_exception:
            pass
    for fd in (1, 2):  # the keeper sees the output end now, not only when this process has exited
        try:
            close(fd)
        except base_exception:
            pass
    write(3, "\n".join((nonce, kind, text)).encode("utf-8", "backslashreplace"))
    close(3)
    os._exit(0)


if __name__ == "__main__":
    helper_main()
