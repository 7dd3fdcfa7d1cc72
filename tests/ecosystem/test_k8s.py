"""deploy/k8s: the StatefulSet (one database volume per pod, probes on
/readyz and /healthz, the image's environment, non-root), the headless
Service it names, the router (its ConfigMap holds deploy/haproxy.cfg, its
shard addresses match the StatefulSet's pods) and the kustomization. Static:
no cluster needed. deploy/haproxy.cfg itself is checked with haproxy -c."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from harness import REPO, have
from test_container import env_of, parse_dockerfile

K8S = os.path.join(REPO, "deploy", "k8s")
CFG = os.path.join(REPO, "deploy", "haproxy.cfg")

if have("yaml"):
    import yaml


def backend(cfg, name):
    """The lines of one backend section of an HAProxy config."""
    m = re.search(r"^backend %s\s*$(.*?)(?=^\S|\Z)" % re.escape(name), cfg, re.M | re.S)
    assert m, "no backend %s" % name
    return m.group(1)


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@unittest.skipUnless(have("yaml"), "needs PyYAML (apt-get install python3-yaml)")
class ManifestTests(unittest.TestCase):
    def setUp(self):
        self.docs = {}
        for name in sorted(os.listdir(K8S)):
            if name.endswith(".yaml") and name != "kustomization.yaml":
                for d in load(name):
                    self.docs[(d["kind"], d["metadata"]["name"])] = d

    def test_kustomization_lists_every_manifest(self):
        k = load("kustomization.yaml")[0]
        files = sorted(n for n in os.listdir(K8S) if n.endswith(".yaml") and n != "kustomization.yaml")
        self.assertEqual(sorted(k["resources"]), files)

    def test_statefulset(self):
        sts = self.docs[("StatefulSet", "optd")]
        spec = sts["spec"]
        svc = self.docs[("Service", spec["serviceName"])]
        self.assertEqual(svc["spec"]["clusterIP"], "None")  # headless
        self.assertTrue(svc["spec"].get("publishNotReadyAddresses"))
        labels = spec["template"]["metadata"]["labels"]
        for k, v in spec["selector"]["matchLabels"].items():
            self.assertEqual(labels[k], v)
        for k, v in svc["spec"]["selector"].items():
            self.assertEqual(labels[k], v)
        claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
        self.assertEqual(sorted(claims), ["backups", "data"])
        for claim in claims.values():
            self.assertEqual(claim["spec"]["accessModes"], ["ReadWriteOnce"])
        (c,) = spec["template"]["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts["data"], "/data")
        env = {e["name"]: e.get("value") for e in c["env"]}
        # backups on a volume of their own
        self.assertEqual(env["OPTD_BACKUP_DIR"], mounts["backups"])
        self.assertFalse(env["OPTD_BACKUP_DIR"].startswith("/data"))
        # every shard among the peers, by the StatefulSet's stable names
        replicas = spec["replicas"]
        self.assertEqual(env["OPTD_PEERS"].split(","),
                         ["http://%s-%d.%s:8080" % (sts["metadata"]["name"], i, spec["serviceName"])
                          for i in range(replicas)])
        image_env = env_of(parse_dockerfile()[1])
        for k, v in image_env.items():
            self.assertEqual(env[k], v)
        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/readyz")
        self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/healthz")
        port = int(image_env["OPTD_LISTEN"].rsplit(":", 1)[1])
        self.assertEqual(c["ports"][0]["containerPort"], port)
        sec = spec["template"]["spec"]["securityContext"]
        self.assertTrue(sec["runAsNonRoot"])
        self.assertEqual(sec["runAsUser"], 10001)
        self.assertEqual(sec["fsGroup"], 10001)
        self.assertGreaterEqual(spec["template"]["spec"]["terminationGracePeriodSeconds"], 10)

    def test_router(self):
        cm = self.docs[("ConfigMap", "optd-router")]
        with open(CFG) as f:
            self.assertEqual(cm["data"]["haproxy.cfg"], f.read(),
                             "run python3 tests/ecosystem/sync_k8s_router.py")
        dep = self.docs[("Deployment", "optd-router")]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        sts = self.docs[("StatefulSet", "optd")]
        replicas = sts["spec"]["replicas"]
        with open(CFG) as f:
            cfg = f.read()
        shards_backend = backend(cfg, "shards")
        servers = re.findall(r"^\s*server (\S+) \"\$\{(OPTD_SHARD\d+)-", shards_backend, re.M)
        self.assertEqual(len(servers), replicas, "one hash server per StatefulSet replica")
        self.assertIn("nbsrv(shards) lt %d" % replicas, cfg)
        svc = sts["spec"]["serviceName"]
        # The container's command makes the shards' names fully qualified
        # from the pod's resolv.conf: run it with a fake one and a fake
        # haproxy that prints the environment it was given.
        got = run_router_command(c, "search team-a.svc.k8s.example.org svc.k8s.example.org k8s.example.org\n"
                                    "nameserver 10.96.0.10\noptions ndots:5\n")
        for i, (srv, var) in enumerate(servers):
            self.assertEqual(srv, "optd-%d" % i)
            self.assertEqual(got[var], "optd-%d.%s.team-a.svc.k8s.example.org:8080" % (i, svc))
        self.assertEqual(got["OPTD_ROUTER_BIND"], env["OPTD_ROUTER_BIND"])
        self.assertEqual(got["ARGS"], "-W -db -f /usr/local/etc/haproxy/haproxy.cfg")
        with self.assertRaises(AssertionError):
            run_router_command(c, "nameserver 10.96.0.10\n")  # no search domain: refuses to start
        router_svc = self.docs[("Service", "optd-router")]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for k, v in router_svc["spec"]["selector"].items():
            self.assertEqual(labels[k], v)
        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/router-healthz")


    def test_no_cluster_domain_is_written(self):
        for name in sorted(os.listdir(K8S)) + ["../haproxy.cfg"]:
            with open(os.path.join(K8S, name)) as f:
                self.assertNotIn("cluster.local", f.read(), name)

    def test_router_timeouts_outlast_the_longest_round(self):
        """A worker round's contribution waits up to round_timeout, whose
        largest allowed value the OpenAPI document states: the router must
        wait longer on both sides."""
        with open(os.path.join(REPO, "http", "openapi.json")) as f:
            doc = json.load(f)
        longest = max(v["maximum"] for v in _find(doc, "round_timeout") if isinstance(v, dict) and "maximum" in v)
        self.assertGreaterEqual(longest, 86400 * 7)
        with open(CFG) as f:
            cfg = f.read()
        for side in ("server", "client"):
            m = re.search(r"^\s*timeout %s (\d+)(us|ms|s|m|h|d)?\s*$" % side, cfg, re.M)
            self.assertTrue(m, "no timeout %s" % side)
            seconds = int(m.group(1)) * {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600,
                                         "d": 86400}[m.group(2)]
            self.assertGreater(seconds, longest, "timeout %s" % side)
            self.assertLess(seconds * 1000, 2 ** 31, "HAProxy's largest timeout")


def _find(node, key):
    """Every value of key anywhere in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def run_router_command(container, resolv_conf):
    """Runs the router container's command with resolv_conf as its
    /etc/resolv.conf and a haproxy that prints its environment; that
    environment (and ARGS, haproxy's arguments) as a dict."""
    tmp = tempfile.mkdtemp(prefix="optd-router-")
    try:
        rc = os.path.join(tmp, "resolv.conf")
        with open(rc, "w") as f:
            f.write(resolv_conf)
        fake = os.path.join(tmp, "haproxy")
        with open(fake, "w") as f:
            f.write('#!/bin/sh\necho "ARGS=$*"\nenv\n')
        os.chmod(fake, 0o755)
        env = {"PATH": tmp + ":/usr/bin:/bin", "RESOLV_CONF": rc}
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        cmd = container["command"] + container.get("args", [])
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=10)
        if r.returncode != 0:
            raise AssertionError("router command failed: %s" % r.stderr)
        return dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@unittest.skipUnless(shutil.which("haproxy"), "needs haproxy")
class HaproxyConfigTests(unittest.TestCase):
    def test_valid_with_and_without_environment(self):
        env = dict(os.environ, OPTD_SHARD0="127.0.0.1:1", OPTD_SHARD1="127.0.0.1:2", OPTD_SHARD2="127.0.0.1:3",
                   OPTD_ROUTER_BIND="127.0.0.1:1")
        r = subprocess.run(["haproxy", "-c", "-f", CFG], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertNotIn("WARNING", r.stdout + r.stderr)
        base = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
        r = subprocess.run(["haproxy", "-c", "-f", CFG], env=base, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)  # defaults: the cluster's names

    def test_hashing_is_consistent(self):
        with open(CFG) as f:
            cfg = f.read()
        shards = backend(cfg, "shards")
        self.assertRegex(shards, r"\n\s*hash-type consistent\b")
        self.assertRegex(shards, r"\n\s*balance hash var\(txn\.session\)")
        self.assertNotRegex(shards, r"\bcheck\b")  # never fail a session over to another shard
        self.assertNotIn("redispatch", shards)
        defaults = re.search(r"^defaults\s*$(.*?)(?=^\S|\Z)", cfg, re.M | re.S).group(1)
        self.assertNotIn("redispatch", defaults)
        self.assertIn("option redispatch", backend(cfg, "any"))  # names no session: any shard will do
        ids = re.findall(r"\bid (\d+)\b", shards)
        self.assertEqual(len(ids), len(set(ids)))
