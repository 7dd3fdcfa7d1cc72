"""One huge step must not stall every other session (issue 12, defect 9):
the writer caps the bytes a group writes, so no commit holds two huge steps
and a small step waits for at most one huge commit (the one running when it
arrives) instead of riding in the next one too. Asserted from the daemon's
own counters (bytes per group, huge commits each small step waited for),
not from timings."""

import array
import re
import threading

from optd_e2e import DaemonTest, uniq


MIB = 1 << 20


def counters(d):
    """(steps by optimizer, small steps by the huge commits they waited for,
    groups by the upper bound of their bytes)."""
    text = d.get("/metrics").body.decode()
    steps = {m.group(1): int(m.group(2))
             for m in re.finditer(r'^optd_steps_total\{optimizer="(\w+)"\} (\d+)$', text, re.M)}
    waits = {m.group(1): int(m.group(2))
             for m in re.finditer(r'^optd_step_heavy_waits_total\{commits="([0-9+]+)"\} (\d+)$', text, re.M)}
    if sorted(waits) != ["0", "1", "2", "3+"]:
        raise AssertionError("/metrics has no optd_step_heavy_waits_total by commits: %r" % text[-2000:])
    groups = {m.group(1): int(m.group(2))
              for m in re.finditer(r'^optd_writer_group_bytes_bucket\{le="([0-9+Inf]+)"\} (\d+)$', text, re.M)}
    if str(64 * MIB) not in groups or "+Inf" not in groups:
        raise AssertionError("/metrics has no optd_writer_group_bytes histogram: %r" % text[-2000:])
    return steps, waits, groups


class GroupBudgetTests(DaemonTest):

    def test_a_small_step_waits_for_at_most_one_huge_commit(self):
        n = 10000000  # sgd: 40 MB of state a step, past the writer's group budget
        big, tiny = uniq("huge"), uniq("tiny")
        self.d.create(big, "sgd", size=n, hyperparams={"lr": 1e-6})
        self.d.create(tiny, "adam", size=8)
        grad = (array.array("f", [0.5]) * n).tobytes()
        stop = threading.Event()
        going = [threading.Event() for _ in range(4)]
        done, errors = [0] * len(going), []

        def huge_steps(i):
            # Several clients, so a huge step is queued behind the one running.
            c = self.d.conn(timeout=120)
            try:
                while not stop.is_set() and done[i] < 100:
                    r = self.d.request("POST", "/v1/sessions/%s/step" % big, body=grad, conn=c,
                                       headers={"Content-Type": "application/octet-stream",
                                                "Prefer": "return=minimal"})
                    if r.status != 200:
                        errors.append(r)
                        return
                    done[i] += 1
                    going[i].set()
            finally:
                going[i].set()
                c.close()

        threads = [threading.Thread(target=huge_steps, args=(i,)) for i in range(len(going))]
        for t in threads:
            t.start()
        try:
            for e in going:
                self.assertTrue(e.wait(120), "no huge step came back")
            s0, w0, g0 = counters(self.d)
            # Small steps one after another until nine huge ones have run
            # beside them (or 200 small ones, whichever comes first).
            small = 0
            while small < 200:
                small += 1
                self.assertEqual(self.d.step(tiny, [0.1] * 8).json["step"], small)
                if small % 5 == 0 and counters(self.d)[0]["sgd"] - s0["sgd"] >= 9:
                    break
            s1, w1, g1 = counters(self.d)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        self.assertEqual(errors, [])
        waits = {k: w1[k] - w0[k] for k in w0}
        self.assertEqual(s1["adam"] - s0["adam"], small)
        self.assertGreater(s1["sgd"] - s0["sgd"], 0, "no huge step ran beside the small ones")
        self.assertEqual(sum(waits.values()), small, "every small step is counted once: %r" % waits)
        # A huge step is 40 MB; two in one commit would be 80.
        over = (g1["+Inf"] - g1[str(64 * MIB)]) - (g0["+Inf"] - g0[str(64 * MIB)])
        self.assertEqual(over, 0, "%d commits held more than 64 MiB of state: huge steps shared a commit" % over)
        self.assertEqual(waits["2"] + waits["3+"], 0,
                         "small steps waited for more than one huge commit: %r" % waits)
        self.assertGreater(waits["1"], 0, "no small step overlapped a huge commit: the test proved nothing")
        self.assertEqual(self.d.session(big)["step"], sum(done))
