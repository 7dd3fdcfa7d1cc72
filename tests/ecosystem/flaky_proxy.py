"""A tiny HTTP proxy that misbehaves on purpose, for the client's retry tests.

For each request it takes the next action from a script (then passes):
  "pass"         forward, return the daemon's reply
  "drop_after"   forward (the daemon applies it), then close the connection
                 without replying: the reply is lost
  "drop_before"  close the connection without forwarding
  "503"          reply 503 unavailable without forwarding
"""

import http.client
import socket
import threading


class FlakyProxy:
    def __init__(self, upstream_port, script=()):
        self.upstream_port = upstream_port
        self.script = list(script)
        self.seen = []  # (method, path, headers dict, action)
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else "pass"

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = []
                while True:
                    h = f.readline().decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    k, v = h.split(":", 1)
                    headers.append((k.strip(), v.strip()))
                hd = {k.lower(): v for k, v in headers}
                body = f.read(int(hd.get("content-length", "0"))) if "content-length" in hd else None
                action = self._next_action()
                with self.lock:
                    self.seen.append((method, path, hd, action))
                if action == "drop_before":
                    return
                if action == "503":
                    payload = b'{"error":{"code":"unavailable","message":"injected by the test proxy"}}'
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 b"Retry-After: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                    continue
                up = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
                fwd = {k: v for k, v in headers if k.lower() not in ("connection", "host", "content-length")}
                up.request(method, path, body=body, headers=fwd)
                r = up.getresponse()
                data = r.read()
                rh = [(k, v) for k, v in r.getheaders()
                      if k.lower() not in ("connection", "content-length", "transfer-encoding")]
                up.close()
                if action == "drop_after":
                    return
                head = "HTTP/1.1 %d %s\r\n" % (r.status, r.reason)
                head += "".join("%s: %s\r\n" % kv for kv in rh)
                head += "Content-Length: %d\r\n\r\n" % len(data)
                conn.sendall(head.encode("latin-1") + data)
        except (OSError, ValueError):
            return
        finally:
            try:
                f.close()
                conn.close()
            except OSError:
                pass
