"""The container image for real, under podman and runc (deploy/podman.sh):
built from deploy/Dockerfile on a locally made Debian base (cached, so only
changed layers are rebuilt), run with a volume for the database, checked
with the curl cookbook and its HEALTHCHECK (which follows --listen), stopped
with SIGTERM (exit 0) and started again on the same volume with every
acknowledged step there. Then the sharded deployment in containers: three
optd containers (--peers each other) behind HAProxy with deploy/haproxy.cfg;
one is killed with SIGKILL under load: its sessions answer 503 through the
router, the others keep working; restarted, every acknowledged step is
there, and the cluster-wide listing through the router shows every shard.
Skipped, saying why, only where podman cannot run containers."""

import json
import os
import subprocess
import threading
import time
import unittest
import uuid

from harness import HAPROXY, HERE, REPO, free_port, optdtest, wait_http

import optd

PODMAN_SH = os.path.join(REPO, "deploy", "podman.sh")
TAG = "localhost/optd:test"
_built = {}  # what setUpModule found: {"error": reason} or {"seconds": build time}


def podman(*args, check=True, timeout=120):
    r = subprocess.run(["sh", PODMAN_SH, "podman"] + list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError("podman %s: %s" % (" ".join(args), (r.stdout + r.stderr)[-2000:]))
    return r


def setUpModule():
    """Builds the image once for both classes; a machine where podman cannot
    run a container skips them with the reason."""
    if os.environ.get("OPTD_SKIP_PODMAN"):
        _built["error"] = "OPTD_SKIP_PODMAN is set"
        return
    r = subprocess.run(["sh", PODMAN_SH, "check"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        _built["error"] = "podman cannot run here: %s" % (r.stdout + r.stderr).strip()[-500:]
        return
    t0 = time.time()
    r = subprocess.run(["sh", PODMAN_SH, "build", TAG], capture_output=True, text=True, timeout=1800)
    _built["seconds"] = time.time() - t0
    if r.returncode != 0:
        _built["build_error"] = (r.stdout + r.stderr)[-4000:]
        return
    # Can this machine start a container at all (namespaces, runc)?
    r = podman("run", "--rm", "--network", "host", "--entrypoint", "/usr/local/bin/optd", TAG, "--version",
               check=False)
    if r.returncode != 0:
        _built["error"] = "podman cannot start a container here: %s" % (r.stdout + r.stderr).strip()[-500:]


def need_image(test):
    if "error" in _built:
        raise unittest.SkipTest(_built["error"])
    if "build_error" in _built:
        test.fail("podman build failed:\n" + _built["build_error"])


class Container:
    """One optd container on the host's network, its database on a named volume."""

    def __init__(self, volume, port, args=()):
        self.volume, self.port, self.args = volume, port, list(args)
        self.name = "optd-test-%s" % uuid.uuid4().hex[:10]
        self.url = "http://127.0.0.1:%d" % port

    def run(self):
        podman("run", "-d", "--name", self.name, "--network", "host", "-v", "%s:/data" % self.volume, TAG,
               "--listen", "127.0.0.1:%d" % self.port, "--log-level", "quiet", *self.args)
        return self

    def wait_ready(self, timeout=60):
        return wait_http(self.port, "/readyz", timeout=timeout)

    def state(self):
        r = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name)
        status, code = r.stdout.split()
        return status, int(code)

    def logs(self):
        return podman("logs", self.name, check=False).stdout[-3000:]

    def remove(self):
        podman("rm", "-f", "-t", "0", self.name, check=False)


def volume():
    name = "optd-test-%s" % uuid.uuid4().hex[:10]
    podman("volume", "create", name)
    return name


def step_until(client, names, acked, stop, errors, per_name=100000):
    """Steps names round robin until stop is set, recording the last
    acknowledged (step, params) of each in acked."""
    k = 0
    while not stop.is_set() and k < per_name * len(names):
        name = names[k % len(names)]
        k += 1
        try:
            r = client.step(name, [1.0, float(k % 7)])
        except optd.Unavailable:
            continue  # its shard is down: retryable, not acknowledged
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            return
        acked[name] = (r.step, list(r.params))


class ImageTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cleanups = []

    @classmethod
    def tearDownClass(cls):
        for f in reversed(cls.cleanups):
            f()

    def test_image_runs_stops_cleanly_and_keeps_its_data(self):
        need_image(self)
        size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
        user = podman("image", "inspect", "--format", "{{.Config.User}}", TAG).stdout.strip()
        self.assertNotIn(user.split(":")[0], ("", "root", "0"))
        r = podman("run", "--rm", "--network", "none", "--entrypoint", "bash", TAG, "-c",
                   "id -u; command -v gcc make cc || true; ls /src 2>&1 || true")
        lines = r.stdout.split()
        self.assertEqual(lines[0], "10001", "runs as the optd user")
        self.assertNotIn("/usr/bin/gcc", r.stdout, "the build tools stay in the build stage")
        self.assertIn("No such file", r.stdout + r.stderr)

        vol = volume()
        self.cleanups.append(lambda: podman("volume", "rm", "-f", vol, check=False))
        port = free_port()
        c = Container(vol, port)
        self.cleanups.append(c.remove)
        t0 = time.time()
        c.run()
        self.assertTrue(c.wait_ready(), c.logs())
        startup = time.time() - t0

        # HEALTHCHECK follows --listen (the port is not the image's 8080).
        r = podman("healthcheck", "run", c.name, check=False)
        self.assertEqual(r.returncode, 0, "HEALTHCHECK failed with --listen 127.0.0.1:%d: %s" % (port, r.stdout + r.stderr))

        # the curl cookbook, as against a daemon on the host
        env = dict(os.environ, OPTD=c.url, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
        r = subprocess.run(["bash", os.path.join(HERE, "curl_cookbook.sh")], capture_output=True, text=True,
                           env=env, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        self.assertEqual(r.stdout.strip().splitlines()[-1], "cookbook ok")

        # steps from several threads, then SIGTERM
        client = optd.Client(c.url, retries=0)
        names = ["img-%d" % i for i in range(6)]
        for n in names:
            client.create(n, "adam", params=[0.5, -0.5], dtype="float64", hyperparams={"lr": 0.01})
        acked, errors, stop = {}, [], threading.Event()
        threads = [threading.Thread(target=step_until, args=(optd.Client(c.url, retries=0), names[i::3], acked,
                                                              stop, errors, 40)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(acked), names)
        t0 = time.time()
        podman("stop", "-t", "30", c.name, timeout=60)  # STOPSIGNAL SIGTERM
        stop_s = time.time() - t0
        self.assertEqual(c.state(), ("exited", 0), c.logs())
        r = podman("healthcheck", "run", c.name, check=False)
        self.assertNotEqual(r.returncode, 0, "HEALTHCHECK passes with the daemon stopped")

        # a new container on the same volume has every acknowledged step
        c2 = Container(vol, free_port())
        self.cleanups.append(c2.remove)
        c2.run()
        self.assertTrue(c2.wait_ready(), c2.logs())
        client2 = optd.Client(c2.url)
        for n in names:
            self.assertEqual(tuple(client2.params(n)), acked[n], n)
        ls = podman("run", "--rm", "--network", "none", "-v", "%s:/data" % vol, "--entrypoint", "bash", TAG, "-c",
                    "stat -c '%u %a' /data/optd.db").stdout.split()
        self.assertEqual(ls[0], "10001", "the database belongs to the image's user")
        print("\n    image %.1f MB, built in %.1f s; started in %.2f s, stopped in %.2f s"
              % (size / 1e6, _built["seconds"], startup, stop_s), end=" ")


@unittest.skipUnless(HAPROXY, "needs haproxy (apt-get install haproxy)")
class ShardedContainerTests(unittest.TestCase):
    """Three optd containers behind HAProxy; one killed with SIGKILL under load."""

    @classmethod
    def setUpClass(cls):
        cls.cleanups = []
        if "error" in _built or "build_error" in _built:
            return
        ports = [free_port() for _ in range(3)]
        peers = ",".join("http://127.0.0.1:%d" % p for p in ports)
        cls.shards = []
        for p in ports:
            vol = volume()
            cls.cleanups.append(lambda v=vol: podman("volume", "rm", "-f", v, check=False))
            c = Container(vol, p, ["--peers", peers])
            cls.cleanups.append(c.remove)
            cls.shards.append(c.run())
        for c in cls.shards:
            assert c.wait_ready(), c.logs()
        cls.router_port = free_port()
        cls.haproxy = optdtest.start_haproxy(optdtest.haproxy_env(cls.router_port, [c.port for c in cls.shards]))
        cls.cleanups.append(lambda: optdtest.stop_process(cls.haproxy))
        cls.router = "http://127.0.0.1:%d" % cls.router_port

    @classmethod
    def tearDownClass(cls):
        for f in reversed(cls.cleanups):
            f()

    def test_sigkill_under_load_loses_nothing_acknowledged(self):
        need_image(self)
        router = optd.Client(self.router, retries=2)
        prefix = "kill-%s" % uuid.uuid4().hex[:6]
        names = ["%s-%02d" % (prefix, i) for i in range(30)]
        for n in names:
            router.create(n, "sgd", params=[0.0, 0.0], dtype="float64", hyperparams={"lr": 1.0})
        home = {}
        for i, c in enumerate(self.shards):
            for s in optd.Client(c.url).list(page_size=1000):
                home[s.name] = i
        self.assertEqual(sorted(n for n in home if n in names), names)
        victim = 1
        on_victim = [n for n in names if home[n] == victim]
        elsewhere = [n for n in names if home[n] != victim]
        self.assertTrue(on_victim and elsewhere, home)

        # every shard behind the router, in one listing
        page = json.loads(_get(self.router_port, "/v1/sessions?scope=cluster&limit=1000"))
        self.assertEqual([s["name"] for s in page["sessions"] if s["name"] in names], names)

        # One client thread per session, so that those waiting on the dead
        # shard hold up no other.
        acked, errors, stop = {}, [], threading.Event()
        threads = [threading.Thread(target=step_until, args=(optd.Client(self.router, retries=0), [n], acked, stop,
                                                              errors)) for n in names]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)  # load going on every shard
            t_kill = time.time()
            podman("kill", "--signal", "KILL", self.shards[victim].name)
            # its sessions answer 503 through the router, the others keep working
            probe = optd.Client(self.router, retries=0)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    probe.get(on_victim[0])
                except optd.Unavailable as e:
                    self.assertEqual((e.status, e.code), (503, "unavailable"))
                    break
                time.sleep(0.05)
            else:
                self.fail("the killed shard's sessions still answer")
            t_503 = time.time()
            before = {n: acked.get(n) for n in elsewhere}
            time.sleep(1.0)
            moved = [n for n in elsewhere if acked.get(n) != before[n]]
            self.assertTrue(moved, "no session on the other shards was stepped while one was down")
            r = _get(self.router_port, "/v1/sessions?scope=cluster", want_status=True)
            self.assertEqual(r[0], 503)
            self.assertIn("127.0.0.1:%d" % self.shards[victim].port, json.loads(r[1])["error"]["message"])
            t0 = time.time()
            podman("start", self.shards[victim].name)
            self.assertTrue(self.shards[victim].wait_ready(), self.shards[victim].logs())
            restart = time.time() - t0
            time.sleep(0.5)  # its sessions being stepped again
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertEqual(errors, [])
        check = optd.Client(self.router, retries=3)
        for n in names:
            if n not in acked:
                continue
            step, params = check.params(n)
            a_step, a_params = acked[n]
            self.assertGreaterEqual(step, a_step, "%s lost acknowledged steps" % n)
            if step == a_step:
                self.assertEqual(list(params), a_params, n)
        page = json.loads(_get(self.router_port, "/v1/sessions?scope=cluster&limit=1000"))
        self.assertEqual([s["name"] for s in page["sessions"] if s["name"] in names], names)
        print("\n    SIGKILL: 503 through the router after %.2f s, %d sessions elsewhere stepped on; "
              "restart to ready %.2f s, %d acknowledged steps checked"
              % (t_503 - t_kill, len(moved), restart, sum(a[0] for a in acked.values())), end=" ")


def _get(port, path, want_status=False):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
    finally:
        c.close()
    if want_status:
        return r.status, body
    if r.status != 200:
        raise AssertionError("GET %s -> %d %r" % (path, r.status, body[:300]))
    return body
