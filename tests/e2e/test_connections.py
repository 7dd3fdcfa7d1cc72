"""Connection limits and deadlines: --max-connections, slow request heads and
idle connections. The deadlines are shortened with the daemon's
--header-timeout and --connection-timeout flags (the contract's defaults of
30 s and more would make the suite slow)."""

import socket
import time

from optd_e2e import DaemonTest


def closed_within(sock, seconds):
    """True if the peer closes (EOF or reset) within seconds; reads and
    discards anything it sends first (e.g. a 408)."""
    sock.settimeout(0.2)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


class MaxConnectionsTests(DaemonTest):
    daemon_args = ("--max-connections", "4")

    def test_connections_beyond_the_limit_are_refused_not_the_served_ones(self):
        conns = [self.d.conn(timeout=5) for _ in range(4)]
        try:
            for c in conns:
                r = self.d.request("GET", "/v1/sessions", conn=c)
                self.assertEqual(r.status, 200, r)
            # a fifth is refused: no successful reply on it
            extra = self.d.conn(timeout=3)
            try:
                r = self.d.request("GET", "/v1/sessions", conn=extra)
                self.assertNotEqual(r.status, 200, "a connection beyond --max-connections was served")
            except OSError:
                pass
            finally:
                extra.close()
            # those being served still are
            for c in conns:
                r = self.d.request("GET", "/healthz", conn=c)
                self.assertEqual(r.status, 200, r)
        finally:
            for c in conns:
                c.close()
        # once they are gone, new connections are served again
        deadline = time.time() + 5
        while True:
            try:
                if self.d.get("/healthz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            self.assertLess(time.time(), deadline, "no new connection served after the old ones closed")
            time.sleep(0.1)


class DeadlineTests(DaemonTest):
    daemon_args = ("--header-timeout", "1", "--connection-timeout", "2")

    def test_trickled_head_is_cut_off_at_the_deadline(self):
        # One byte every 50 ms keeps the connection from ever being idle for
        # the 2 s idle timeout; only the 1 s head deadline can end it.
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
        s.setblocking(False)
        head = b"GET /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        start = time.time()
        closed_at = None
        try:
            for b in head:
                try:
                    s.send(bytes([b]))
                    data = s.recv(4096)
                    if data == b"" or data:  # EOF, or an error reply (408) before the close
                        closed_at = time.time()
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at = time.time()
                    break
                if time.time() - start > 5:
                    break
                time.sleep(0.05)
        finally:
            s.close()
        self.assertIsNotNone(closed_at, "a head trickled for %.1f s was not cut off (deadline 1 s)"
                             % (time.time() - start))
        self.assertLess(closed_at - start, 3.5, "cut off only after %.1f s" % (closed_at - start))
        self.assertEqual(self.d.get("/healthz").status, 200)

    def test_idle_connection_is_closed(self):
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
        try:
            self.assertTrue(closed_within(s, 6), "an idle connection stayed open")
        finally:
            s.close()

    def test_idle_keep_alive_connection_is_closed(self):
        c = self.d.conn(timeout=5)
        try:
            self.assertEqual(self.d.request("GET", "/healthz", conn=c).status, 200)
            self.assertTrue(closed_within(c.sock, 6), "an idle keep-alive connection stayed open")
        finally:
            c.close()

    def test_a_prompt_client_is_served(self):
        c = self.d.conn(timeout=5)
        try:
            for _ in range(3):
                self.assertEqual(self.d.request("GET", "/healthz", conn=c).status, 200)
                time.sleep(0.5)
        finally:
            c.close()
