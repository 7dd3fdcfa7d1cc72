"""deploy/Dockerfile, checked statically, and deploy/build-image-rootfs.sh,
run for real into a temporary directory: the produced binary is started from
there with the Dockerfile's environment (as the Dockerfile's non-root user in
a chroot when root), answers, keeps its database in the volume, passes the
Dockerfile's HEALTHCHECK, and exits 0 on SIGTERM. No Docker engine needed."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import unittest
import uuid

from harness import REPO, free_port, wait_http

import optd

DOCKERFILE = os.path.join(REPO, "deploy", "Dockerfile")
SCRIPT = os.path.join(REPO, "deploy", "build-image-rootfs.sh")
RUNTIME_PKGS = {"libmicrohttpd12", "libcjson1", "libsqlite3-0", "libcurl4"}
BASE_PKGS = {"libc6"}  # in debian:bookworm-slim already


def parse_dockerfile(path=DOCKERFILE):
    """[(stage_name_or_None, [(INSTRUCTION, args), ...]), ...]"""
    with open(path) as f:
        text = f.read()
    logical, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        logical.append(cur + s)
        cur = ""
    stages = []
    for ins in logical:
        word, _, args = ins.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            stages.append({"from": m.group(1), "name": m.group(2), "ins": []})
        stages[-1]["ins"].append((word, args.strip()))
    return stages


def env_of(stage):
    env = {}
    for word, args in stage["ins"]:
        if word == "ENV":
            for kv in shlex.split(args):
                k, _, v = kv.partition("=")
                env[k] = v
    return env


def apt_installs(stage):
    pkgs = set()
    for word, args in stage["ins"]:
        if word == "RUN" and "apt-get install" in args:
            for part in args.split("&&"):
                if "apt-get install" in part:
                    pkgs |= {w for w in part.split("apt-get install", 1)[1].split() if not w.startswith("-")}
    return pkgs


class DockerfileTests(unittest.TestCase):
    def setUp(self):
        self.stages = parse_dockerfile()

    def test_multi_stage_on_bookworm_slim(self):
        self.assertEqual(len(self.stages), 2)
        for s in self.stages:
            self.assertEqual(s["from"], "debian:bookworm-slim")
        build, runtime = self.stages
        self.assertTrue(build["name"])
        self.assertTrue(any(w == "RUN" and "make" in a and "build/optd" in a for w, a in build["ins"]))
        self.assertTrue({"libmicrohttpd-dev", "libcjson-dev", "libsqlite3-dev", "libcurl4-openssl-dev",
                         "pkg-config"} <= apt_installs(build))
        self.assertEqual(apt_installs(runtime), RUNTIME_PKGS)  # runtime libraries only
        copies = [a for w, a in runtime["ins"] if w == "COPY"]
        self.assertEqual(copies, ["deploy/healthcheck.sh /usr/local/bin/optd-healthcheck",
                                  "--from=%s /src/build/optd /usr/local/bin/optd" % build["name"]])
        # the build stage copies the sources only, never the whole context
        for w, a in build["ins"]:
            if w == "COPY":
                self.assertNotRegex(a, r"^\.\s", "COPY . . sends everything, .git and databases included")

    def test_runtime_settings(self):
        runtime = self.stages[1]
        ins = dict((w, a) for w, a in runtime["ins"])
        self.assertEqual(env_of(runtime), {"OPTD_DB": "/data/optd.db", "OPTD_LISTEN": "0.0.0.0:8080"})
        self.assertEqual(ins["VOLUME"], "/data")
        self.assertEqual(ins["EXPOSE"], "8080")
        user = ins["USER"].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        self.assertIn("useradd", ins["RUN"])
        self.assertEqual(healthcheck_cmd(self.stages), ["/usr/local/bin/optd-healthcheck"])
        with open(os.path.join(REPO, "deploy", "healthcheck.sh")) as f:
            self.assertIn("GET /healthz", f.read())
        self.assertEqual(json.loads(ins["ENTRYPOINT"]), ["/usr/local/bin/optd"])
        self.assertEqual(ins.get("STOPSIGNAL"), "SIGTERM")

    def test_rootfs_script_agrees(self):
        with open(SCRIPT) as f:
            script = f.read()
        runtime = self.stages[1]
        m = re.search(r'^RUNTIME_PKGS="([^"]*)"', script, re.M)
        self.assertEqual(set(m.group(1).split()), apt_installs(runtime))
        m = re.search(r'^BUILD_PKGS="([^"]*)"', script, re.M)
        self.assertEqual(set(m.group(1).split()), apt_installs(self.stages[0]))
        m = re.search(r'^IMAGE_ENV="([^"]*)"', script, re.M)
        self.assertEqual(dict(l.split("=", 1) for l in m.group(1).split()), env_of(runtime))
        uid = re.search(r"--uid (\d+)", dict(runtime["ins"])["RUN"]).group(1)
        self.assertIn("OPTD_UID=%s" % uid, script)


class DockerignoreTests(unittest.TestCase):
    """What .dockerignore lets into the build context: the sources the build
    stage copies and the healthcheck; never .git, build/ or database files."""

    def included(self, path):
        import fnmatch
        with open(os.path.join(REPO, ".dockerignore")) as f:
            pats = [l.strip() for l in f if l.strip() and not l.startswith("#")]
        keep = True
        for p in pats:  # the last matching pattern decides (Docker's rule)
            neg = p.startswith("!")
            p = p.lstrip("!").rstrip("/")
            parts = path.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[:i]), p) for i in range(1, len(parts) + 1))
            if p.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(x, p[3:]) for x in parts)
            if hit:
                keep = neg
        return keep

    def test_context(self):
        for path in ("Makefile", "http/http.c", "http/assets/dashboard.html", "engine/writer.c", "store/store.c", "daemon/main.c",
                     "optim/kernels.c", "common/err.h", "deploy/healthcheck.sh"):
            self.assertTrue(self.included(path), path)
        for path in (".git", ".git/HEAD", "build/optd", "optd.db", "optd.db-wal", "http/optd.db", "tests/e2e/run.py",
                     "bench/run.py", "deploy/k8s/router.yaml"):
            self.assertFalse(self.included(path), path)
        stages = parse_dockerfile()
        for w, a in stages[0]["ins"] + stages[1]["ins"]:
            if w == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    self.assertTrue(self.included(src.rstrip("/")), "COPY %s is kept out by .dockerignore" % src)


def healthcheck_cmd(stages):
    args = dict(stages[1]["ins"])["HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3:].strip())


@unittest.skipUnless(shutil.which("make") and shutil.which("gcc"), "needs make and gcc")
class RootfsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="optd-rootfs-")
        cls.root = os.path.join(cls.tmp, "rootfs")
        r = subprocess.run(["sh", SCRIPT, cls.root], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise AssertionError("build-image-rootfs.sh failed:\n" + (r.stdout + r.stderr)[-3000:])
        cls.stages = parse_dockerfile()
        cls.env = env_of(cls.stages[1])
        cls.chroot = shutil.which("chroot") if os.geteuid() == 0 else None
        cls.uid = 10001

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_layout(self):
        exe = os.path.join(self.root, "usr/local/bin/optd")
        self.assertTrue(os.access(exe, os.X_OK))
        with open(os.path.join(self.root, "etc/passwd")) as f:
            users = {l.split(":")[0]: l.split(":") for l in f.read().splitlines()}
        self.assertEqual(users["optd"][2:4], [str(self.uid), str(self.uid)])
        with open(os.path.join(self.root, "etc/optd.env")) as f:
            self.assertEqual(dict(l.split("=", 1) for l in f.read().split()), self.env)
        st = os.stat(os.path.join(self.root, "data"))
        if os.geteuid() == 0:
            self.assertEqual((st.st_uid, st.st_gid), (self.uid, self.uid))
        out = subprocess.run([exe, "--help"], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0)
        self.assertIn("--listen", out.stdout + out.stderr)

    @unittest.skipUnless(shutil.which("readelf") and shutil.which("dpkg"), "needs readelf and dpkg")
    def test_needed_libraries_come_from_the_runtime_packages(self):
        exe = os.path.join(self.root, "usr/local/bin/optd")
        dyn = subprocess.run(["readelf", "-d", exe], capture_output=True, text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
        self.assertTrue(needed)
        ldd = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
        where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
        pkgs = set()
        for lib in needed:
            path = os.path.realpath(where[lib])
            owner = ""
            for cand in (where[lib], path, path.replace("/usr/lib/", "/lib/"), path.replace("/lib/", "/usr/lib/", 1)):
                r = subprocess.run(["dpkg", "-S", cand], capture_output=True, text=True)
                if r.returncode == 0:
                    owner = r.stdout.split(":")[0]
                    break
            self.assertTrue(owner, "no package owns %s" % path)
            pkgs.add(owner)
        self.assertLessEqual(pkgs, RUNTIME_PKGS | BASE_PKGS, "the Dockerfile's runtime stage lacks some")

    def test_runs_as_the_image_would(self):
        port = free_port()
        env = dict(self.env)
        env["OPTD_LISTEN"] = env["OPTD_LISTEN"].rsplit(":", 1)[0] + ":%d" % port  # the image's host, a free port
        if self.chroot:
            prefix = [self.chroot, "--userspec=%d:%d" % (self.uid, self.uid), self.root, "/usr/bin/env", "-C", "/data"]
            db_on_host = os.path.join(self.root, env["OPTD_DB"].lstrip("/"))
        else:  # not root: the same binary and paths, the database under the root fs
            prefix = ["env"]
            env["OPTD_DB"] = os.path.join(self.root, env["OPTD_DB"].lstrip("/"))
            db_on_host = env["OPTD_DB"]
        exe = "/usr/local/bin/optd" if self.chroot else os.path.join(self.root, "usr/local/bin/optd")
        cmd = prefix + ["%s=%s" % kv for kv in sorted(env.items())] + [exe]
        log = open(os.path.join(self.tmp, "optd.log"), "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin"})
        try:
            self.assertTrue(wait_http(port, "/readyz", proc=proc), self._log())
            c = optd.Client("http://127.0.0.1:%d" % port)
            s = c.create("img-%s" % uuid.uuid4().hex[:6], "adam", params=[1.0, 2.0], hyperparams={"lr": 0.1})
            self.assertEqual(s.step([0.5, -0.5]).step, 1)
            self.assertTrue(os.path.exists(db_on_host), "the database is not in the volume")
            if self.chroot:
                st = os.stat(db_on_host)
                self.assertEqual(st.st_uid, self.uid, "the database is not the non-root user's")
            # the Dockerfile's HEALTHCHECK, as Docker would run it in the container
            hc = healthcheck_cmd(self.stages)
            if self.chroot:
                hc_cmd = [self.chroot, "--userspec=%d:%d" % (self.uid, self.uid), self.root, "/usr/bin/env"] + \
                         ["%s=%s" % kv for kv in sorted(env.items())] + hc
            else:  # the host's other optd processes are not this container's
                hc_cmd = ["env", "OPTD_HEALTHCHECK_PROC=/nonexistent"] + ["%s=%s" % kv for kv in sorted(env.items())] + \
                         [os.path.join(self.root, hc[0].lstrip("/"))] + hc[1:]
            r = subprocess.run(hc_cmd, capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
            self.assertEqual(r.returncode, 0, "HEALTHCHECK failed: %s" % r.stderr)
            proc.send_signal(signal.SIGTERM)  # STOPSIGNAL
            self.assertEqual(proc.wait(15), 0, self._log())
            r = subprocess.run(hc_cmd, capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
            self.assertNotEqual(r.returncode, 0, "HEALTHCHECK passes with the daemon stopped")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()

    def _log(self):
        with open(os.path.join(self.tmp, "optd.log"), "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")
