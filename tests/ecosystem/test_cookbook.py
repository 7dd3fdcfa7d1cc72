"""README.md's curl cookbook: every command it shows is in
tests/ecosystem/curl_cookbook.sh, which runs them against a fresh daemon and
checks their output."""

import os
import re
import shutil
import subprocess
import unittest

from harness import HERE, REPO, Daemon

README = os.path.join(REPO, "README.md")
SCRIPT = os.path.join(HERE, "curl_cookbook.sh")
SETUP = ("OPTD=", 'cd "$(mktemp -d)"')  # the script gets OPTD from its environment


def commands(markdown):
    """The commands of the ```sh blocks, continuation lines joined, spaces collapsed."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
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
