#!/usr/bin/env python3
"""Copies deploy/haproxy.cfg into the ConfigMap of deploy/k8s/router.yaml
(the block under `haproxy.cfg: |`). With --check, exits 1 if they differ."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(REPO, "deploy", "haproxy.cfg")
YAML = os.path.join(REPO, "deploy", "k8s", "router.yaml")
KEY = "  haproxy.cfg: |\n"


def render(yaml_text, cfg_text):
    head, sep, rest = yaml_text.partition(KEY)
    if not sep:
        raise SystemExit("%s has no '%s'" % (YAML, KEY.strip()))
    _, sep2, tail = rest.partition("\n---\n")
    block = "".join(("    " + line if line.strip() else "\n") if line != "\n" else "\n"
                    for line in cfg_text.splitlines(True))
    if not block.endswith("\n"):
        block += "\n"
    return head + KEY + block + "---\n" + tail if sep2 else head + KEY + block


def main(argv):
    with open(YAML) as f:
        y = f.read()
    with open(CFG) as f:
        c = f.read()
    new = render(y, c)
    if "--check" in argv:
        if new != y:
            print("deploy/k8s/router.yaml does not hold deploy/haproxy.cfg; run %s" % sys.argv[0])
            return 1
        return 0
    with open(YAML, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
