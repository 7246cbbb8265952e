"""The sandbox for model-generated code (steps/sandbox/), run for real: normal programs in every language, and
hostile ones (fork bomb, infinite loop, 1 GB of output, writes outside, sockets, ~/.ssh, memory hogs, detached
children) in every mode this machine has (bwrap where it works, and the rlimits fallback). Each hostile run must end
as a failed or killed result, leave nothing running and nothing written outside its directory, and leave the test
process unharmed. Where the fallback documents that it does not protect something, the test says so (skip)."""
from __future__ import annotations

import os
import shutil
import pwd
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from steps import sandbox
from steps.sandbox import run_code

ROOT = Path(__file__).resolve().parent.parent
MODES = sandbox.available_modes()
HAS_NODE = sandbox._node() is not None
needs_node = pytest.mark.skipif(not HAS_NODE, reason="node is not installed")


def _live_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds ``token``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _our_uids_alive() -> list[int]:
    """Live processes running as one of the dedicated uids this test process's runs used."""
    low = sandbox.UID_BASE + ((os.getpid() & 0xFFFFF) << 8)
    return sandbox.live_processes(lambda uid: low <= uid < low + 256)


@pytest.fixture
def unharmed():
    """After a hostile run: nothing of ours left running, no working directory or cgroup left, and this process can
    still start processes."""
    yield
    deadline = time.monotonic() + 3
    while _our_uids_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _our_uids_alive()
    left = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"mergeforge-sandbox-{os.getpid()}-")]
    assert not left, left
    base = sandbox._pids_cgroup_base()
    if base is not None:
        assert not [p for p in os.listdir(base) if p.startswith(f"{os.getpid()}-")]
    assert subprocess.run(["true"]).returncode == 0


# ------------------------------------------------------------------------------------------------- normal programs

@pytest.mark.parametrize("mode", MODES)
def test_python_prints_reads_stdin_and_imports_its_files(mode):
    files = {"solution.py": "def add(a, b):\n    return a + b\n",
             "pkg/__init__.py": "", "pkg/data.py": "VALUE = 41\n",
             "main.py": "import sys\nfrom solution import add\nfrom pkg.data import VALUE\n"
                        "print(add(VALUE, 1), sys.stdin.read().strip().upper())\n"}
    r = run_code("python", files, ["main.py"], stdin="héllo", mode=mode)
    assert r.ok and r.stdout == "42 HÉLLO\n" and r.stderr == "" and r.mode == mode, r
    # the interpreter's name in argv is accepted and dropped
    assert run_code("python", files, ["python3", "main.py"], mode=mode).stdout.startswith("42")


@pytest.mark.parametrize("mode", MODES)
def test_python_failure_is_a_failed_result(mode):
    r = run_code("python", {"s.py": "def f(:\n"}, ["s.py"], mode=mode)
    assert r.returncode == 1 and "SyntaxError" in r.stderr and r.killed is None and not r.ok
    r = run_code("python", {"s.py": "import os; os.kill(os.getpid(), 11)"}, ["s.py"], mode=mode)
    assert r.returncode == -signal.SIGSEGV and r.killed is None


@pytest.mark.parametrize("mode", MODES)
def test_environment_is_cleared(mode, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_value")
    r = run_code("python", {"e.py": "import os; print(sorted(os.environ.items()))"}, ["e.py"], mode=mode)
    assert r.ok, r
    env = dict(eval(r.stdout))
    assert "secret" not in r.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "USER", "LOGNAME", "PWD", "PYTHONDONTWRITEBYTECODE",
                        "PYTHONHASHSEED", "PYTHONUTF8", "PYTHONNOUSERSITE"}, env


@needs_node
@pytest.mark.parametrize("mode", MODES)
def test_node_runs(mode):
    files = {"lib.js": "module.exports = (xs) => xs.map(x => x * 2);",
             "main.js": "const dbl = require('./lib.js');\n"
                        "let input = ''; process.stdin.on('data', d => input += d);\n"
                        "process.stdin.on('end', () => console.log(JSON.stringify(dbl(JSON.parse(input)))));"}
    r = run_code("javascript", files, ["node", "main.js"], stdin="[1, 2, 3]", mode=mode)
    assert r.ok and r.stdout == "[2,4,6]\n", r
    r = run_code("javascript", {"t.js": "throw new Error('boom')"}, ["t.js"], mode=mode)
    assert r.returncode == 1 and "boom" in r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_sqlite_query(mode):
    files = {"schema.sql": "CREATE TABLE emp(name TEXT, dept TEXT, salary INT);\n"
                           "INSERT INTO emp VALUES ('ann','eng',120),('bob','eng',100),('cy','ops',90);",
             "query.sql": "-- average salary per department\n"
                          "SELECT dept, AVG(salary) AS avg_salary FROM emp GROUP BY dept ORDER BY dept; SELECT 'a;b'"}
    r = run_code("sql", files, ["schema.sql", "query.sql"], mode=mode)
    assert r.ok and r.stdout == '["eng", 110.0]\n["ops", 90.0]\n["a;b"]\n', r
    r = run_code("sql", files, ["--header", "schema.sql", "query.sql"], mode=mode)
    assert r.stdout.splitlines()[0] == '["dept", "avg_salary"]'
    r = run_code("sql", {"bad.sql": "SELECT * FROM nowhere;"}, ["bad.sql"], mode=mode)
    assert r.returncode == 1 and "no such table" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("mode", MODES)
def test_pytest_passes_and_fails(mode):
    files = {"solution.py": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** .5) + 1))\n",
             "test_solution.py": "from solution import is_prime\n"
                                 "def test_primes():\n    assert [n for n in range(20) if is_prime(n)] == "
                                 "[2, 3, 5, 7, 11, 13, 17, 19]\n"}
    r = run_code("pytest", files, ["-q", "test_solution.py"], mode=mode)
    assert r.ok and "1 passed" in r.stdout, r
    files["solution.py"] = "def is_prime(n):\n    return n % 2 == 1\n"
    r = run_code("pytest", files, ["pytest", "-q", "test_solution.py"], mode=mode)
    assert r.returncode == 1 and "1 failed" in r.stdout and r.killed is None


def test_bad_arguments_are_refused():
    for name in ("../x.py", "/etc/x.py", "a/../../x", "", "a//b"):
        with pytest.raises(ValueError):
            run_code("python", {name: ""}, ["x.py"])
    with pytest.raises(ValueError):
        run_code("cobol", {}, [])
    with pytest.raises(ValueError):
        run_code("python", {}, [], mode="docker")


# ------------------------------------------------------------------------------------------------ hostile programs

BOMB = """
import os, sys, time
# A fork bomb, bounded so that a broken sandbox cannot take the machine down: at most 2**9 processes.
for depth in range(9):
    try:
        os.fork()
    except OSError as e:
        sys.stderr.write("fork failed: errno %d\\n" % e.errno)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode, unharmed):
    token = f"bomb-{uuid.uuid4().hex}"
    conf = sandbox.describe("python", mode)
    r = run_code("python", {"bomb.py": BOMB}, ["bomb.py", token], timeout_s=3, mode=mode)
    assert r.timed_out and r.killed == "timeout" and r.returncode is None and not r.ok
    assert r.elapsed_s < 8
    if conf.process_limit is not None:
        assert "fork failed: errno 11" in r.stderr, (conf, r.stderr[:500])   # EAGAIN: the limit held
    assert not _live_with(token)


@needs_node
def test_node_spawn_bomb_next_to_normal_runs(unharmed):
    """A bomb in one run costs that run only: concurrent runs (each its own uid or namespace) still pass."""
    token = f"bomb-{uuid.uuid4().hex}"
    bomb = ("const {spawn} = require('child_process');\n"
            "for (let i = 0; i < 200; i++) spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)', "
            f"'{token}']).on('error', e => console.error(e.code));")
    results = {}

    def normal(i):
        results[i] = run_code("python", {"m.py": f"import time; time.sleep(0.5); print({i})"}, ["m.py"], timeout_s=20)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    r = run_code("javascript", {"b.js": bomb}, ["b.js", token], timeout_s=3)
    for t in threads:
        t.join()
    assert r.killed == "timeout"
    if sandbox.describe("javascript").process_limit is not None:
        assert "EAGAIN" in r.stderr
    assert all(results[i].ok and results[i].stdout == f"{i}\n" for i in range(3)), results
    assert not _live_with(token)


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop(mode, unharmed):
    r = run_code("python", {"loop.py": "while True:\n    pass\n"}, ["loop.py"], timeout_s=1, mode=mode)
    assert r.timed_out and r.killed == "timeout" and r.returncode is None
    assert r.elapsed_s < 4


@pytest.mark.parametrize("mode", MODES)
def test_detached_child_does_not_outlive_the_run(mode, unharmed):
    """A program that double-forks into a new session and ignores SIGTERM, then exits at once."""
    token = f"escapee-{uuid.uuid4().hex}"
    code = textwrap.dedent("""
        import os, signal, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]])
            os._exit(0)
        time.sleep(0.3)
        print("parent done")
    """)
    conf = sandbox.describe("python", mode)
    r = run_code("python", {"e.py": code}, ["e.py", token], timeout_s=10, mode=mode)
    assert r.stdout == "parent done\n" and r.elapsed_s < 5, r
    left = _live_with(token)
    if left and conf.mode == "rlimits" and conf.user != "dedicated uid" and conf.process_limit != "cgroup pids.max":
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.skip("documented: the fallback without a dedicated uid or cgroup cannot follow a process that "
                    "leaves its process group")
    assert not left


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_gigabyte_of_output(mode, stream, unharmed):
    code = (f"import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    sys.{stream}.buffer.write(chunk)\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_code("python", {"flood.py": code}, ["flood.py"], timeout_s=30, mode=mode)
    assert r.killed == "output cap" and r.returncode is None and not r.ok
    assert len(getattr(r, stream)) == sandbox.OUTPUT_CAP and set(getattr(r, stream)) == {"x"}
    assert r.elapsed_s < 10
    # the test process never held more than the caps: its peak RSS did not grow by anything like a gigabyte
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024   # KiB


@needs_node
@pytest.mark.parametrize("mode", MODES)
def test_many_lines_of_output_from_node(mode, unharmed):
    r = run_code("javascript", {"f.js": "for (;;) console.log('line of output')"}, ["f.js"], timeout_s=30, mode=mode)
    assert r.killed == "output cap" and len(r.stdout) == sandbox.OUTPUT_CAP


def _escape_targets(tmp_path: Path, token: str) -> dict[str, tuple[str, Path]]:
    """where -> (the path the program writes to, where that lands on the host if it gets through)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    absolute = {"checkout": ROOT / f"sandbox-escape-{token}",
                "tmp": Path("/tmp") / f"outside-{token}",
                "home": Path(pwd.getpwuid(os.getuid()).pw_dir) / f"sandbox-escape-{token}",
                "fake home": home / f"escape-{token}",
                "test dir": tmp_path / f"escape-{token}"}
    targets = {where: (str(path), path) for where, path in absolute.items()}
    # out of its working directory by a relative path (the fallback's directory is in the temp dir)
    targets["relative"] = (f"../escape-rel-{token}", Path(tempfile.gettempdir()) / f"escape-rel-{token}")
    return targets


def _blocked(conf: sandbox.Confinement, where: str) -> bool:
    """Whether the mode guarantees that a write to ``where`` fails (see the module docstring)."""
    if conf.filesystem_isolated:
        return True
    if conf.user == "dedicated uid":    # anyone may write to the world-writable temp dir
        return where not in ("tmp", "relative")
    return False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", ["python", "javascript"])
def test_writing_outside_its_directory(mode, language, tmp_path, unharmed):
    if language == "javascript" and not HAS_NODE:
        pytest.skip("node is not installed")
    token = uuid.uuid4().hex
    targets = _escape_targets(tmp_path, token)
    conf = sandbox.describe(language, mode)
    gaps = []
    try:
        for where, (path, target) in targets.items():
            if language == "python":
                files, argv = {"w.py": f"open({path!r}, 'w').write('pwned')\n"}, ["w.py"]
            else:
                files, argv = {"w.js": f"require('fs').writeFileSync({path!r}, 'pwned')"}, ["w.js"]
            r = run_code(language, files, argv, mode=mode)
            if _blocked(conf, where):
                assert not target.exists(), where
                if not (conf.filesystem_isolated and where == "tmp"):   # bwrap: /tmp is its own, private one
                    assert r.returncode != 0 and not r.ok, (where, r)
            elif target.exists():
                gaps.append(where)
    finally:
        for _, target in targets.values():
            target.unlink(missing_ok=True)
    if gaps:
        pytest.skip(f"documented: {mode} as {conf.user} lets {language} write to {', '.join(gaps)} (removed)")


def test_big_files_are_stopped():
    """RLIMIT_FSIZE stops one big file; in bwrap the working directory is a small tmpfs, so many files stop too."""
    for mode in MODES:
        r = run_code("python", {"big.py": "open('big', 'wb').write(b'x' * (100 << 20))"}, ["big.py"], mode=mode)
        assert r.killed == "file size" and r.returncode == 1 and "File too large" in r.stderr, (mode, r)
    r = run_code("javascript", {"big.js": "require('fs').writeFileSync('big', Buffer.alloc(100 << 20))"}, ["big.js"])
    assert r.killed == "file size" and r.returncode == 1 and "EFBIG" in r.stderr, r
    if "bwrap" in MODES:
        code = ("for i in range(10):\n    open(f'f{i}', 'wb').write(b'x' * (15 << 20))\n")   # bounded: 150 MB
        r = run_code("python", {"many.py": code}, ["many.py"], mode="bwrap")
        assert r.returncode == 1 and "No space left" in r.stderr, r


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    yield srv
    srv.close()


@pytest.mark.parametrize("mode", MODES)
def test_sockets(mode, listener, unharmed):
    port = listener.getsockname()[1]
    conf = sandbox.describe("python", mode)
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'pwned')\n"
    r = run_code("python", {"c.py": code}, ["c.py"], mode=mode)
    try:
        conn, _ = listener.accept()
        conn.close()
        reached = True
    except TimeoutError:
        reached = False
    if not conf.network_isolated:
        assert reached and r.ok
        pytest.skip(f"documented: {mode} has the host's network (loopback reached)")
    assert not reached and r.returncode == 1 and "ConnectionRefused" in r.stderr, r
    # An external address: only inside the network namespace, where nothing can leave (TEST-NET-1, RFC 5737).
    code = ("import socket\nprint(socket.if_nameindex())\n"
            "socket.create_connection(('192.0.2.1', 80), timeout=2)\n")
    r = run_code("python", {"c.py": code}, ["c.py"], mode=mode)
    assert r.returncode == 1 and "unreachable" in r.stderr and r.stdout == "[(1, 'lo')]\n", r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", ["python", "javascript"])
def test_reading_ssh_keys(mode, language, tmp_path, monkeypatch, unharmed):
    if language == "javascript" and not HAS_NODE:
        pytest.skip("node is not installed")
    secret = f"-----BEGIN OPENSSH PRIVATE KEY----- fake {uuid.uuid4().hex}"
    key = tmp_path / "home" / ".ssh" / "id_rsa"
    key.parent.mkdir(parents=True)
    key.parent.chmod(0o700)
    key.write_text(secret)
    key.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf = sandbox.describe(language, mode)
    if language == "python":
        files = {"r.py": "import os\nfor p in ['~/.ssh/id_rsa', os.environ.get('HOME', '') + '/.ssh/id_rsa', "
                         f"{str(key)!r}]:\n    try:\n        print(open(os.path.expanduser(p)).read())\n"
                         "    except OSError as e:\n        print('denied', p, e.errno)\n"
                         f"open({str(key)!r}).read()\n"}
    else:
        files = {"r.js": f"const fs = require('fs'); console.log(fs.readFileSync({str(key)!r}, 'utf8'))"}
    r = run_code(language, files, [next(iter(files))], mode=mode)
    leaked = secret in r.stdout or secret in r.stderr
    if not conf.filesystem_isolated and conf.user != "dedicated uid":
        assert leaked
        pytest.skip(f"documented: {mode} as {conf.user} can read the caller's files (~/.ssh included)")
    assert not leaked and r.returncode != 0 and not r.ok, r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", ["python", "javascript"])
def test_cannot_touch_the_callers_processes(mode, language, monkeypatch, unharmed):
    """Neither read the caller's environment through /proc nor signal a process of the caller's."""
    if language == "javascript" and not HAS_NODE:
        pytest.skip("node is not installed")
    secret = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    victim = subprocess.Popen(["sleep", "30"], env=dict(os.environ))     # holds the secret in its environment
    conf = sandbox.describe(language, mode)
    try:
        if language == "python":
            code = (f"import os, signal\ntry:\n    print(open('/proc/{victim.pid}/environ').read())\n"
                    f"except OSError as e:\n    print('environ', e)\nos.kill({victim.pid}, signal.SIGKILL)\n")
            files = {"k.py": code}
        else:
            code = (f"const fs = require('fs'); try {{ console.log(fs.readFileSync('/proc/{victim.pid}/environ', "
                    f"'utf8')) }} catch (e) {{ console.log('environ', e.code) }}\n"
                    f"process.kill({victim.pid}, 'SIGKILL')")
            files = {"k.js": code}
        r = run_code(language, files, [next(iter(files))], mode=mode)
        time.sleep(0.1)
        if not conf.filesystem_isolated and conf.user != "dedicated uid":
            assert secret in r.stdout and victim.poll() is not None
            pytest.skip(f"documented: {mode} as {conf.user} can read and signal the caller's processes")
        assert secret not in r.stdout and r.returncode != 0, r
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", MODES)
def test_memory_hog_python(mode, unharmed):
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    r = run_code("python", {"hog.py": code}, ["hog.py"], memory_mb=256, timeout_s=20, mode=mode)
    assert r.killed == "memory" and r.returncode == 1 and "MemoryError" in r.stderr, r
    assert r.elapsed_s < 10


@needs_node
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["buffers", "heap"])
def test_memory_hog_node(mode, kind, unharmed):
    code = {"buffers": "const a = []; for (;;) a.push(Buffer.alloc(1 << 24, 1));",
            "heap": "const a = []; for (;;) a.push(new Array(1e5).fill(1.5));"}[kind]
    r = run_code("javascript", {"hog.js": code}, ["hog.js"], memory_mb=256, timeout_s=30, mode=mode)
    assert r.killed == "memory" and r.returncode != 0 and not r.ok, r
    assert r.elapsed_s < 20


@pytest.mark.parametrize("mode", MODES)
def test_killing_the_caller_leaves_no_orphan(mode, tmp_path):
    """kill -9 of the process that called run_code: the sandboxed program dies with it (bwrap --die-with-parent;
    the launcher's PR_SET_PDEATHSIG in the fallback)."""
    token = f"orphan-{uuid.uuid4().hex}"
    caller = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom steps.sandbox import run_code\n"
              f"print('start', flush=True)\nrun_code('python', {{'s.py': 'import time; time.sleep(60)'}}, "
              f"['s.py', {token!r}], timeout_s=60, mode={mode!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", caller], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"start\n"
        deadline = time.monotonic() + 15
        while not _live_with(token):
            assert time.monotonic() < deadline, "the sandboxed program never started"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while _live_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _live_with(token)
        # what it left on disk (the fallback's working directory) is swept by the next process to use the sandbox
        sandbox._sweep_stale.__wrapped__()
        assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"mergeforge-sandbox-{proc.pid}-")]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        for pid in _live_with(token):
            os.kill(pid, signal.SIGKILL)


def test_mode_detection():
    """bwrap wherever it works (the mode is detected once and cached); every result says its mode."""
    assert MODES[-1] == "rlimits"
    if os.environ.get("CI") and shutil.which("bwrap"):     # CI installs bubblewrap: both modes must be exercised
        assert MODES[0] == "bwrap", sandbox._bwrap_probe()
    if os.environ.get(sandbox.ENV_MODE, "auto") in ("", "auto"):
        assert sandbox.sandbox_mode() == MODES[0]
    assert run_code("python", {"a.py": "pass"}, ["a.py"]).mode == sandbox.sandbox_mode()
    for language in sandbox.LANGUAGES:
        assert sandbox.describe(language, "bwrap").filesystem_isolated
        assert not sandbox.describe(language, "rlimits").network_isolated


def test_a_root_below_tmp_is_bound_over_the_private_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout (its venv) under /tmp: the private /tmp tmpfs is mounted first, the venv bound on top of it."""
    monkeypatch.setattr(sandbox.bwrap, "_ro_roots", lambda language: ["/tmp/clone/.venv"])
    args = sandbox._bwrap_args("python", root=True)
    tmpfs = max(i for i, a in enumerate(args) if a == "--tmpfs" and args[i + 1] == "/tmp")
    bind = max(i for i, a in enumerate(args) if a == "--ro-bind" and args[i + 1] == "/tmp/clone/.venv")
    assert tmpfs < bind
