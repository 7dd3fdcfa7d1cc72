"""TypeScript types generated from the served /v1/openapi.json with
openapi-typescript type-check a small client (tests/ecosystem/ts/client.ts)
under tsc --strict, and the compiled client then works against the daemon.
The npm packages are installed from the npm registry into build/ts (a cache
under the build tree), once; without npm the test is skipped and says so."""

import json
import os
import shutil
import subprocess
import unittest

from harness import HERE, REPO, DaemonCase, raw

TS_DIR = os.path.join(REPO, "build", "ts")
PACKAGES = ["openapi-typescript@7", "typescript@5"]
TSCONFIG = {"compilerOptions": {"strict": True, "target": "es2022", "module": "commonjs", "lib": ["es2022", "dom"],
                                "types": [], "outDir": "out", "noUnusedLocals": True},
            "files": ["client.ts", "api.d.ts"]}


def tool(name):
    return os.path.join(TS_DIR, "node_modules", ".bin", name)


def install():
    """openapi-typescript and typescript into build/ts, unless there already."""
    if os.path.exists(tool("tsc")) and os.path.exists(tool("openapi-typescript")):
        return
    os.makedirs(TS_DIR, exist_ok=True)
    r = subprocess.run(["npm", "install", "--prefix", TS_DIR, "--cache", os.path.join(TS_DIR, ".npm-cache"),
                        "--no-audit", "--no-fund", "--loglevel=error"] + PACKAGES,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise AssertionError("npm install %s failed: %s" % (" ".join(PACKAGES), r.stdout[-2000:] + r.stderr[-2000:]))


@unittest.skipUnless(shutil.which("npm") and shutil.which("node"),
                     "npm and node are not installed: cannot run openapi-typescript and tsc (apt-get install npm)")
class TypeScriptTests(DaemonCase):

    def test_generated_types_type_check_a_client_that_then_works(self):
        install()
        work = os.path.join(TS_DIR, "work")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        st, _, doc = raw(self.d.port, "GET", "/v1/openapi.json")
        self.assertEqual(st, 200)
        with open(os.path.join(work, "openapi.json"), "wb") as f:
            f.write(doc)
        shutil.copy(os.path.join(HERE, "ts", "client.ts"), work)
        with open(os.path.join(work, "tsconfig.json"), "w") as f:
            json.dump(TSCONFIG, f)
        r = subprocess.run([tool("openapi-typescript"), "openapi.json", "-o", "api.d.ts"], cwd=work,
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = subprocess.run([tool("tsc"), "-p", "tsconfig.json"], cwd=work, capture_output=True, text=True, timeout=300)
        self.assertEqual(r.returncode, 0, "tsc --strict rejects the client with the generated types:\n" + r.stdout + r.stderr)
        r = subprocess.run(["node", os.path.join(work, "out", "client.js"), self.url], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stdout.strip(), "ts client ok")
