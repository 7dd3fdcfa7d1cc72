"""README.md's commands: every ```sh block of it is in
tests/ecosystem/curl_cookbook.sh (the curl cookbook and the training
features, run against a fresh daemon with their output checked) or in
tests/ecosystem/readme_commands.sh (the Python client's install), except a
block marked `<!-- readme-test: skip (why) -->` on the line before it.
docs/API.md is the contract (../shared/API.md) and README links it."""

import os
import re
import shutil
import subprocess
import unittest

from harness import HERE, REPO, SYSTEM_PYTHON, Daemon

README = os.path.join(REPO, "README.md")
SCRIPT = os.path.join(HERE, "curl_cookbook.sh")
COMMANDS = os.path.join(HERE, "readme_commands.sh")
DOC = os.path.join(REPO, "docs", "API.md")
SHARED = os.path.join(os.path.dirname(REPO), "shared", "API.md")
SETUP = ("OPTD=", 'cd "$(mktemp -d)"')  # the script gets OPTD from its environment


def commands(markdown, skip_marked=False):
    """The commands of the ```sh blocks, continuation lines joined, spaces
    collapsed (without the blocks marked readme-test: skip when asked)."""
    out = []
    for m in re.finditer(r"(<!-- readme-test: skip[^>]*-->\s*\n)?[ \t]*```sh\n(.*?)```", markdown, re.S):
        if skip_marked and m.group(1):
            continue
        block = m.group(2)
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = " ".join(cmd.split())
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def normalized(script):
    return " ".join(script.replace("\\\n", " ").split())


class CookbookTests(unittest.TestCase):
    def test_every_command_is_tested(self):
        with open(README) as f:
            text = f.read()
        # The cookbook is the README section from its heading to the next "## ".
        section = text[text.index("## curl cookbook"):]
        section = section[:section.index("\n## ", 1)]
        cmds = commands(section)
        with open(SCRIPT) as f:
            script = normalized(f.read())
        self.assertGreater(len(cmds), 20)
        for cmd in cmds:
            if cmd.startswith(SETUP[0]):
                continue
            with self.subTest(cmd=cmd):
                self.assertIn(cmd, script)

    def test_every_readme_block_is_run(self):
        with open(README) as f:
            cmds = commands(f.read(), skip_marked=True)
        with open(SCRIPT) as f:
            script = normalized(f.read())
        with open(COMMANDS) as f:
            script += " " + normalized(f.read())
        for cmd in cmds:
            if cmd.startswith(SETUP):
                continue
            with self.subTest(cmd=cmd):
                self.assertIn(cmd, script, "a README command that no test runs")

    def test_readme_links_the_contract_shipped_in_the_repository(self):
        with open(README) as f:
            text = f.read()
        self.assertIn("(docs/API.md)", text)
        self.assertNotIn("../shared", text)

    @unittest.skipUnless(os.path.exists(SHARED), "no ../shared/API.md beside the repository")
    def test_docs_api_md_is_the_contract(self):
        with open(DOC, "rb") as a, open(SHARED, "rb") as b:
            self.assertEqual(a.read(), b.read(), "docs/API.md differs from ../shared/API.md: copy it (cp ../shared/API.md docs/API.md)")

    @unittest.skipUnless(shutil.which("bash") and os.path.exists(SYSTEM_PYTHON), "needs bash and Debian's python3")
    def test_readme_commands_run(self):
        if subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, setuptools, wheel"], capture_output=True).returncode:
            self.skipTest("Debian's python3-venv, python3-setuptools or python3-wheel is missing "
                          "(deploy/install-deps.sh ecosystem installs them)")
        env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
        env.pop("PYTHONPATH", None)
        r = subprocess.run(["bash", COMMANDS], capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        self.assertEqual(r.stdout.strip().splitlines()[-1], "readme ok")

    @unittest.skipUnless(shutil.which("curl") and shutil.which("bash"), "needs curl and bash")
    def test_cookbook_runs(self):
        d = Daemon().start()
        try:
            # Debian's python3 first: the commands use python3 for a binary file
            env = dict(os.environ, OPTD=d.url, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
            r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
            self.assertEqual(r.stdout.strip().splitlines()[-1], "cookbook ok")
        finally:
            d.cleanup()
