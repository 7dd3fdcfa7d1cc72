"""deploy/k8s: the StatefulSet (one database volume per pod, probes on
/readyz and /healthz, the image's environment, non-root), the headless
Service it names, the router (its ConfigMap holds deploy/haproxy.cfg, its
shard addresses match the StatefulSet's pods) and the kustomization. Static:
no cluster needed. deploy/haproxy.cfg itself is checked with haproxy -c."""

import os
import re
import shutil
import subprocess
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
        claims = spec["volumeClaimTemplates"]
        self.assertEqual(len(claims), 1)
        self.assertEqual(claims[0]["spec"]["accessModes"], ["ReadWriteOnce"])
        (c,) = spec["template"]["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts[claims[0]["metadata"]["name"]], "/data")
        env = {e["name"]: e.get("value") for e in c["env"]}
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
        for i, (srv, var) in enumerate(servers):
            self.assertEqual(srv, "optd-%d" % i)
            self.assertEqual(env[var], "optd-%d.%s.$(POD_NAMESPACE).svc.cluster.local:8080" % (i, svc))
        router_svc = self.docs[("Service", "optd-router")]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for k, v in router_svc["spec"]["selector"].items():
            self.assertEqual(labels[k], v)
        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/router-healthz")


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
        self.assertNotIn("redispatch", cfg)
        ids = re.findall(r"\bid (\d+)\b", shards)
        self.assertEqual(len(ids), len(set(ids)))
