"""Student code in a process of its own, confined; the grader gets back data only.

Three kinds of process take part in grading one chapter (tools/coursework.py drives them):

- the **grader** (coursework's judge): runs the chapter's set-up cells and, for each answer,
  the complete check cell, in a fork of itself (a fresh copy of the set-up for every check).
  No student code ever runs in it or in its forks.
- the **student server** (``serve``, started by ``Server``): runs the same set-up cells once,
  never sees a check or a reference, and forks one **student process** per answer.
- a **student process** (``_student_main``): confines itself (below), receives one answer
  over its own socket, runs it, and answers the check's questions: the values of the names
  the exercise asks for, and the results of calling the student's functions on arguments the
  check chose (``Remote``). Everything it sends is a data frame (tools/wire.py): a patched
  ``isinstance``, an object whose comparisons are all true, a replaced ``torch.allclose``
  stay in that process. It is killed when the check is done.

Limits of a student process, each costing the student that exercise with a note:
``TIME_LIMIT`` seconds of its computation per exercise (the answer and every call the check
makes; a check's own computation is not counted), ``MEMORY_LIMIT`` bytes of address space
beyond the set-up (a ``MemoryError`` in the answer), ``OUTPUT_LIMIT`` bytes written to
stdout, stderr or any file (then the kernel stops it with SIGXFSZ). A crash (``os._exit``,
a segfault) ends only that process.

Confinement, where the machine allows it (``confinement()`` says what is in effect; grading
prints it). With Linux's Landlock (kernel 5.13 or later, no privileges needed) a student
process may read only the Python installation, the library and system folders, write only its
own scratch folder, open no TCP connection, and send no signal to a process outside it: it
cannot read the chapters (whose hidden tests hold the references), another student's
notebook or the grader's files, and cannot kill the grader. Run as root, it also becomes the
user ``nobody``. Without Landlock and without root, a student process can still read what the
grading user can read: the report says so.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wire  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 60                 # seconds of a student's computation per exercise
MEMORY_LIMIT = 4 << 30          # bytes of address space beyond the chapter's set-up
OUTPUT_LIMIT = 8 << 20          # bytes of output (stdout, stderr) and of any file written
NOBODY = "nobody"


class StudentLost(BaseException):
    """The student's process cannot answer any more: it ended, ran out of time, or sent
    something that is not data. A BaseException, so that no ``except Exception`` in a check
    turns it into a pass."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail or kind)
        self.kind, self.detail = kind, detail          # "ended", "timeout", "garbled"


class StudentError(Exception):
    """The student's code raised: the message is theirs, the exercise fails as it would."""


# --------------------------------------------------------------------------------------------
# Confinement (applied by each student process to itself, before it reads its answer)
# --------------------------------------------------------------------------------------------

_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446   # x86-64 and arm64 alike
_PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 38, 36
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1, 2


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (or the platform is not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(ctypes.c_long(_SYS_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, int(v))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1                          # ABI 1: execute ... make_sym
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def _read_roots(protected: list[Path]) -> list[Path]:
    """Folders a student process may read: Python, its packages, the library, the system.
    A folder that holds a protected one (the chapters, the submissions) is left out."""
    import depthlab

    candidates = [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                    sys.base_exec_prefix)]
    candidates += [Path(p) for p in sys.path if p]
    candidates += [Path(depthlab.__file__).resolve().parents[1]]
    candidates += [Path(p) for p in ("/usr", "/lib", "/lib64", "/bin", "/etc", "/proc",
                                     "/sys", "/dev", "/opt")]
    roots = []
    for c in candidates:
        try:
            c = c.resolve()
        except OSError:
            continue
        if not c.exists() or c in roots:
            continue
        if any(p == c or c in p.parents for p in protected):
            continue
        roots.append(c)
    return roots


def _landlock(abi: int, scratch: Path, protected: list[Path]) -> None:
    """Restrict this process (and its children) with Landlock; raises OSError on failure."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fs = _fs_rights(abi)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64),
                    ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
                       (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(ctypes.c_long(_SYS_CREATE), ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    file_rights = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | (
        _FS_TRUNCATE if abi >= 3 else 0) | (_FS_IOCTL_DEV if abi >= 5 else 0)
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR

    def allow(path: Path, rights: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not path.is_dir():
                rights &= file_rights
            rule = PathBeneath(rights & fs, fd)
            if libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1),
                            ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        finally:
            os.close(fd)

    try:
        for root in _read_roots(protected):
            allow(root, read | (_FS_IOCTL_DEV if str(root) == "/dev" and abi >= 5 else 0))
        allow(Path("/dev/null"), _FS_READ_FILE | _FS_WRITE_FILE)
        allow(scratch, fs)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT), ctypes.c_int(ruleset),
                        ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def nobody_can_run() -> bool:
    """Whether a process that became ``nobody`` can still read Python, torch and depthlab
    (not where Python lives in root's home folder, as pyenv puts it). Tried in a fork."""
    if os.geteuid() != 0:
        return False
    try:
        nobody = pwd.getpwnam(NOBODY)
    except KeyError:
        return False
    import torch

    import depthlab

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            for module in (os, torch, depthlab, json):
                Path(module.__file__).read_bytes()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] == 0


def confinement(abi: int | None = None, nobody: bool | None = None) -> str:
    """One sentence: how student processes are confined on this machine."""
    abi = landlock_abi() if abi is None else abi
    nobody = nobody_can_run() if nobody is None else nobody
    parts = [f"own process per exercise; {TIME_LIMIT} s, {MEMORY_LIMIT >> 30} GiB beyond the "
             f"set-up, {OUTPUT_LIMIT >> 20} MiB of output"]
    if abi:
        what = "reads only Python, the library and system folders, writes only its scratch "
        what += "folder" + (", no TCP" if abi >= 4 else "")
        what += ", no signals to the grader" if abi >= 6 else ""
        parts.append(f"Landlock ABI {abi}: {what}")
    else:
        parts.append("NO Landlock on this kernel: student code can read what the grading user "
                     "can read (the chapters' hidden tests included) and signal its processes")
    if nobody:
        parts.append(f"runs as user {NOBODY}")
    elif os.geteuid() == 0:
        parts.append(f"runs as root without capabilities (user {NOBODY} cannot read this "
                     "Python installation)")
    return "; ".join(parts)


def _confine(scratch: Path, protected: list[Path], abi: int, memory_limit: int,
             nobody: bool) -> None:
    """Everything a student process does to itself before it reads the student's code."""
    os.setpgid(0, 0)                                 # the server kills the whole group
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    cap = _vm_size() + memory_limit
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))   # hard too: the student cannot raise it
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(scratch / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    # The server pointed sys.stdout at /dev/null for the set-up: the student's prints go to
    # the capped file instead, so that printing without end is stopped, not just slow.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(scratch)
    os.environ.update(HOME=str(scratch), TMPDIR=str(scratch), MPLCONFIGDIR=str(scratch))
    tempfile.tempdir = str(scratch)
    sys.dont_write_bytecode = True
    if abi:
        _landlock(abi, scratch, protected)
    if nobody:
        user = pwd.getpwnam(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))    # counts nobody's processes
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    elif os.geteuid() == 0:
        _drop_capabilities()       # root without its powers: no modules, mounts, raw sockets


_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}


def _drop_capabilities() -> None:
    """Give up every capability, now and for any child (bounding and ambient sets too)."""
    import platform

    libc = _libc()
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)                      # PR_CAPBSET_DROP (EINVAL past last)
    libc.prctl(47, 4, 0, 0, 0)                            # PR_CAP_AMBIENT_CLEAR_ALL
    number = _SYS_CAPSET.get(platform.machine())
    if number is None:
        raise OSError(f"cannot drop capabilities on {platform.machine()}")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)         # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()                        # effective, permitted, inheritable
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(number), header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


# --------------------------------------------------------------------------------------------
# The student server and its student processes
# --------------------------------------------------------------------------------------------


def _make_shell():
    """An IPython shell without history (forks must not share a history database)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    return InteractiveShell.instance(config=config)


def serve(ctrl_fd: int, jobfile: str) -> None:
    """The student server: set-up once, then one forked student process per request.

    Requests on ``ctrl`` (a SOCK_SEQPACKET socket from the grader, JSON): ``fork`` with a
    socket passed along (the new student process's connection to the grader), answered with
    its pid; ``reap`` a pid, answered with its wait status once it and everything it started
    is gone; ``stop``."""
    ctrl = socket.socket(fileno=ctrl_fd)
    job = json.loads(Path(jobfile).read_text())
    import torch

    torch.set_num_threads(1)
    shell = _make_shell()
    sys.stdout = open(os.devnull, "w")                 # the set-up's prints are not reported
    try:
        for src in job["setup"]:
            r = shell.run_cell(src, silent=True, store_history=False)
            if not r.success:
                raise RuntimeError(f"{type(r.error_in_exec or r.error_before_exec).__name__}: "
                                   f"{r.error_in_exec or r.error_before_exec}")
    except Exception as exc:
        ctrl.send(json.dumps({"setup_error": str(exc)[:500]}).encode())
        return
    # Orphans of a student process (it may fork and exit) become children of this server,
    # which kills them when it reaps that student process.
    _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    abi, nobody = landlock_abi(), nobody_can_run()
    base = Path(tempfile.mkdtemp(prefix="depthlab-students-"))
    os.chmod(base, 0o711)                       # a student process can enter its own folder
    protected = [Path(p).resolve() for p in job["protected"]] + [Path(jobfile).parent.resolve()]
    ctrl.send(json.dumps({"ready": True, "confinement": confinement(abi, nobody)}).encode())
    scratch: dict[int, Path] = {}
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(ctrl, 4096, 1)
            if not data:
                break
            msg = json.loads(data)
            if msg["op"] == "fork":
                folder = Path(tempfile.mkdtemp(dir=base))
                if nobody:
                    os.chown(folder, pwd.getpwnam(NOBODY).pw_uid, pwd.getpwnam(NOBODY).pw_gid)
                pid = os.fork()
                if pid == 0:
                    code = 70
                    try:
                        ctrl.close()
                        code = _student_main(fds[0], folder, shell, protected, abi,
                                             job["memory_limit"], nobody)
                    finally:
                        os._exit(code)
                try:
                    os.setpgid(pid, pid)
                except OSError:
                    pass
                for fd in fds:
                    os.close(fd)
                scratch[pid] = folder
                ctrl.send(json.dumps({"pid": pid}).encode())
            elif msg["op"] == "reap":
                pid = int(msg["pid"])
                status = _reap(pid)
                shutil.rmtree(scratch.pop(pid, ""), ignore_errors=True)
                ctrl.send(json.dumps({"status": status}).encode())
            else:
                break
    finally:
        for pid in list(scratch):
            _reap(pid)
        shutil.rmtree(base, ignore_errors=True)


def _reap(pid: int) -> int:
    """Kill a student process's group, wait for it, and kill any orphan it left behind."""
    for kill in (os.killpg, os.kill):         # the process too, should it have left its group
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    status = 0
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    for _ in range(100):                    # orphans reparented to this server (subreaper)
        try:
            child, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if child == 0:
            stray = _children()
            if not stray:
                break
            for c in stray:
                try:
                    os.kill(c, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)
    return status


def _children() -> list[int]:
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry.name))
    return found


def _student_main(fd: int, scratch: Path, shell, protected, abi: int, memory_limit: int,
                  nobody: bool) -> int:
    """One student process: confine, run the answer, serve the check's calls."""
    chan = socket.socket(fileno=fd)
    try:
        _confine(scratch, protected, abi, memory_limit, nobody)
    except Exception as exc:             # never run student code unconfined by mistake
        chan.sendall(wire.pack({"confine_error": f"{type(exc).__name__}: {exc}"}))
        return 71
    import numpy as np
    import torch

    handles: dict[int, object] = {}

    def handle(obj) -> int:
        handles[len(handles) + 1] = obj
        return len(handles)

    job = wire.recv_pickle(chan)
    result = shell.run_cell(job["code"], silent=True, store_history=False)
    if not result.success:
        err = result.error_before_exec or result.error_in_exec
        chan.sendall(wire.pack({"error": _describe(err)}))
    else:
        chan.sendall(_answer_frame(shell.user_ns, job, handle))
    while True:
        msg = wire.recv_pickle(chan)
        if msg.get("op") != "call":
            return 0
        try:
            target = handles[msg["handle"]]
            args, kwargs = msg["args"], msg["kwargs"]
            leaves = wire.mutable_leaves((args, kwargs))
            torch_state, numpy_state, python_state = msg["rng"]
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)
            with torch.set_grad_enabled(msg["grad"]):
                value = target(*args, **kwargs)
            reply = wire.pack({"value": value, "after": [wire.leaf_state(x) for x in leaves]},
                              handle)
        except BaseException as exc:  # noqa: BLE001 (SystemExit too: it is the student's)
            reply = wire.pack({"error": _describe(exc)})
        chan.sendall(reply)


def _answer_frame(ns: dict, job: dict, handle) -> bytes:
    """The values the answer gave the exercise's names, as one data frame: {"sets": [...]},
    one {name: value} per value set (the constants trial has several, in ``_value_sets``).
    A name the answer did not define is left out; a value the format cannot carry makes
    its set {"!unreadable": why}."""
    enc = wire.Encoder(handle)
    wire.register_value_classes()
    sets = []
    for values in (ns.get("_value_sets", []) if job.get("sets")
                   else [{n: ns[n] for n in job["names"] if n in ns}]):
        pairs = []
        try:
            for name, value in values.items():
                pairs.append([name, enc(value, where=name)])
        except Exception as exc:         # Unreadable, or the student's object raised
            pairs = [["!unreadable", _describe(exc) if not isinstance(exc, wire.Unreadable)
                      else str(exc)[:300]]]
        sets.append({"!dict": pairs})
    return wire.frame({"!dict": [["sets", sets]]}, enc.blobs)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# --------------------------------------------------------------------------------------------
# The grader's side
# --------------------------------------------------------------------------------------------


class Server:
    """The grader's handle on a student server (see ``serve``)."""

    def __init__(self, setup: list[str], *, protected: list[Path], workdir: Path,
                 env: dict[str, str], memory_limit: int = MEMORY_LIMIT):
        import subprocess

        self._jobdir = Path(tempfile.mkdtemp(prefix="depthlab-server-"))   # mode 0700
        jobfile = self._jobdir / "setup.json"
        jobfile.write_text(json.dumps({"setup": setup, "memory_limit": memory_limit,
                                       "protected": [str(p) for p in protected]}))
        self.ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", str(theirs.fileno()), str(jobfile)],
            pass_fds=[theirs.fileno()], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.confinement = ""

    def wait_ready(self, timeout: float) -> None:
        """Raises RuntimeError when the set-up failed or the server died."""
        reply = self._recv(timeout)
        if "setup_error" in reply:
            raise RuntimeError(f"the chapter's set-up failed in the student server: "
                               f"{reply['setup_error']}")
        self.confinement = reply.get("confinement", "")

    def _recv(self, timeout: float) -> dict:
        self.ctrl.settimeout(timeout)
        try:
            data = self.ctrl.recv(4096)
        except (TimeoutError, OSError) as exc:
            raise RuntimeError(f"the student server did not answer ({exc})") from exc
        if not data:
            raise RuntimeError(f"the student server ended (exit status {self.proc.poll()})")
        return json.loads(data)

    def fork(self) -> tuple[int, socket.socket]:
        """A new student process: its pid and the grader's end of its connection."""
        mine, theirs = socket.socketpair()
        try:
            socket.send_fds(self.ctrl, [json.dumps({"op": "fork"}).encode()], [theirs.fileno()])
        finally:
            theirs.close()
        return int(self._recv(60)["pid"]), mine

    def reap(self, pid: int) -> int:
        """Kill the student process (and whatever it started); its wait status."""
        self.ctrl.send(json.dumps({"op": "reap", "pid": pid}).encode())
        return int(self._recv(60)["status"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.ctrl.send(json.dumps({"op": "stop"}).encode())
            self.proc.wait(timeout=30)
        except Exception:
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        self.ctrl.close()
        shutil.rmtree(self._jobdir, ignore_errors=True)


class Student:
    """The grader's view of one student process: ask for the answer's values, call its
    functions. Counts the time spent waiting for it against ``time_limit``."""

    def __init__(self, sock: socket.socket, time_limit: float):
        self.sock, self.time_limit, self.used = sock, time_limit, 0.0
        self.lost: StudentLost | None = None

    def _exchange(self, message: dict):
        if self.lost is not None:
            raise self.lost
        start = time.perf_counter()
        left = max(0.01, self.time_limit - self.used)
        try:
            self.sock.settimeout(left)
            wire.send_pickle(self.sock, message)
            reply = wire.recv_data(self.sock, handle=self._remote,
                                   deadline=time.monotonic() + left)
        except TimeoutError:
            self.lost = StudentLost("timeout", f"took longer than {self.time_limit:g} s")
        except (EOFError, ConnectionError, BrokenPipeError):
            self.lost = StudentLost("ended", "its process ended before grading was done")
        except wire.WireError as exc:
            self.lost = StudentLost("garbled", f"sent something that is not data ({exc})")
        finally:
            self.used += time.perf_counter() - start
        if self.lost is not None:
            raise self.lost
        if type(reply) is not dict:
            self.lost = StudentLost("garbled", "sent something that is not a reply")
            raise self.lost
        if "confine_error" in reply:
            self.lost = StudentLost("garbled", f"could not be confined: {reply['confine_error']}")
            raise self.lost
        return reply

    def answer(self, code: str, names: list[str], *, sets: bool = False) -> list[dict]:
        """Run the answer; the values it gave ``names`` (one dict, or one per value set).
        Raises StudentError when the answer raised or a value cannot be read."""
        reply = self._exchange({"code": code, "names": names, "sets": sets})
        if "error" in reply:
            raise StudentError(str(reply["error"]))
        out = reply.get("sets")
        if type(out) is not list or not all(type(s) is dict for s in out):
            self.lost = StudentLost("garbled", "sent values in the wrong form")
            raise self.lost
        for values in out:
            if "!unreadable" in values:
                raise StudentError(f"{values['!unreadable']}")
            for name, value in values.items():
                if isinstance(value, Remote):
                    value._name = name
        return out

    def call(self, handle: int, name: str, args: tuple, kwargs: dict):
        import numpy as np
        import torch

        leaves = wire.mutable_leaves((args, kwargs))
        reply = self._exchange({
            "op": "call", "handle": handle, "args": args, "kwargs": kwargs,
            "grad": torch.is_grad_enabled(),
            # The call starts from the grader's random state, as a call in the notebook would.
            # The state is not taken back: the student would choose the check's next draws.
            "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate())})
        if "error" in reply:
            raise StudentError(f"{name}: {reply['error']}")
        apply_states(leaves, reply.get("after"), name)
        value = reply.get("value")
        if isinstance(value, Remote):
            value._name = f"result of {name}(...)"
        return value

    def _remote(self, n: int) -> Remote:
        return Remote(self, n, f"handle {n}")

    def exit(self) -> None:
        try:
            self.sock.settimeout(1)
            wire.send_pickle(self.sock, {"op": "exit"})
        except Exception:
            pass
        self.sock.close()


class Remote:
    """A student's function (or any callable of theirs), standing in the grader: a call sends
    the arguments to the student's process and returns the result, as data. In-place changes
    to tensor, array and module arguments come back too (``apply_states``)."""

    __slots__ = ("_student", "_handle", "_name")

    def __init__(self, student: Student, handle: int, name: str):
        self._student, self._handle, self._name = student, handle, name

    def __call__(self, *args, **kwargs):
        return self._student.call(self._handle, self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<the student's {self._name}>"


def apply_states(leaves: list, states, name: str) -> None:
    """Write what a call left in its arguments into the grader's own objects."""
    import numpy as np
    import torch

    if type(states) is not list or len(states) != len(leaves):
        raise StudentError(f"{name}: the student's process reported its arguments wrongly")
    with torch.no_grad():
        for leaf, new in zip(leaves, states):
            if isinstance(leaf, torch.nn.Module):
                old = leaf.state_dict(keep_vars=True)
                if type(new) is not dict or set(new) != set(old):
                    raise StudentError(f"{name} changed the structure of a module it was given")
                pairs = [(old[k], new[k]) for k in old]
            else:
                pairs = [(leaf, new)]
            for mine, theirs in pairs:
                if isinstance(mine, torch.Tensor):
                    if (not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape
                            or theirs.dtype != mine.dtype):
                        raise StudentError(f"{name} changed the shape or type of an argument")
                    if not torch.equal(mine.detach().cpu(), theirs):
                        mine.copy_(theirs)
                elif isinstance(mine, np.ndarray):
                    if (not isinstance(theirs, np.ndarray) or theirs.shape != mine.shape
                            or theirs.dtype != mine.dtype):
                        raise StudentError(f"{name} changed the shape or type of an argument")
                    if mine.flags.writeable and not np.array_equal(mine, theirs,
                                                                   equal_nan=True):
                        np.copyto(mine, theirs)


def describe_status(status: int) -> str:
    """Why a student process ended, from its wait status (negative: not known)."""
    if status < 0:
        return "its process ended before grading was done"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXFSZ:
            return f"stopped: it wrote more than {OUTPUT_LIMIT >> 20} MiB (output or files)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"its process crashed ({name})"
    if os.WIFEXITED(status):
        return f"its process exited (status {os.WEXITSTATUS(status)}) before grading was done"
    return "its process ended before grading was done"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        try:
            serve(int(sys.argv[2]), sys.argv[3])
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
