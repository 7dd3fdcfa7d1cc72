"""Several optd daemons as one: each session lives on exactly one shard.

A router (deploy/haproxy.cfg) sends every request that names a session to the
shard chosen by a consistent hash of the name; a request that names none
(``GET /v1/sessions``) reaches one arbitrary shard and so sees only its
sessions. :func:`list_all` and :class:`ShardedClient` fan the listing out to
every shard and merge the pages in name order.
"""

import hashlib
import heapq
import threading

from .client import Client
from .errors import NotFound

__all__ = ["ShardedClient", "list_all"]


def _clients(shards, **kw):
    return [s if isinstance(s, Client) else Client(s, **kw) for s in shards]


def _name_key(session):
    return session.name.encode("utf-8")  # the daemon's order: bytes


def list_all(shards, limit=None, after=None, page_size=None, **client_kw):
    """Iterates over the sessions of every shard (URLs or :class:`Client`
    objects) in name order, as one daemon would list them. Each shard is read
    lazily, page by page (``page_size`` per request); ``limit`` caps the total;
    ``after`` starts past a name."""
    iters = [c.list(after=after, page_size=page_size) for c in _clients(shards, **client_kw)]
    for n, s in enumerate(heapq.merge(*iters, key=_name_key)):
        if limit is not None and n >= limit:
            return
        yield s


class ShardedClient:
    """A client of a sharded deployment.

    ``shards``: the URLs (or Clients) of every shard, each reached directly —
    used for listing (fan-out) and, without a router, for everything.
    ``router``: the URL of the router (HAProxy) in front of them; when given,
    every request about one session goes through it. Without a router, an
    existing session is found by asking the shards (and remembered), and a new
    one is placed by a rendezvous hash of its name over ``shards``.

    Per-session methods are those of :class:`Client` (create, get, step,
    params, checkpoint, restore, patch, delete, history). ``fork`` copies
    through a checkpoint, since source and copy may live on different shards.
    """

    def __init__(self, shards, router=None, **client_kw):
        self.shards = _clients(shards, **client_kw)
        if not self.shards:
            raise ValueError("ShardedClient needs at least one shard")
        self.router = None
        if router is not None:
            self.router = router if isinstance(router, Client) else Client(router, **client_kw)
        self._where = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return "optd.ShardedClient(%r, router=%r)" % ([c.url for c in self.shards],
                                                      self.router.url if self.router else None)

    # -- placement ---------------------------------------------------------
    def home(self, name):
        """The shard a new session ``name`` is created on without a router
        (rendezvous hashing: adding a shard moves only the names it wins)."""
        def score(c):
            return hashlib.sha256((c.url + "\0" + name).encode("utf-8")).digest()
        return max(self.shards, key=score)

    def locate(self, name):
        """The shards (Clients) that hold ``name``, asking each directly."""
        found = []
        for c in self.shards:
            try:
                c.get(name)
                found.append(c)
            except NotFound:
                pass
        return found

    def client_for(self, name):
        """The Client to send requests about ``name`` to."""
        if self.router is not None:
            return self.router
        with self._lock:
            c = self._where.get(name)
        if c is None:
            found = self.locate(name)
            c = found[0] if found else self.home(name)
            with self._lock:
                self._where[name] = c
        return c

    def _call(self, method, name, *a, **kw):
        c = self.client_for(name)
        try:
            return getattr(c, method)(name, *a, **kw)
        except NotFound:
            with self._lock:
                self._where.pop(name, None)
            raise

    # -- listing -----------------------------------------------------------
    def list(self, limit=None, after=None, page_size=None):
        """Every shard's sessions merged in name order (see :func:`list_all`)."""
        return list_all(self.shards, limit=limit, after=after, page_size=page_size)

    def list_page(self, limit=100, after=None):
        """One merged page ``([Session, ...], next)`` as a single daemon would
        give it: ``next`` is the last name when more sessions follow."""
        pages = [c.list_page(limit=limit, after=after) for c in self.shards]
        merged = list(heapq.merge(*[p for p, _ in pages], key=_name_key))
        more = len(merged) > limit or any(nxt is not None and len(p) == limit for p, nxt in pages)
        merged = merged[:limit]
        return merged, (merged[-1].name if merged and more else None)

    # -- sessions (routed by name) ----------------------------------------
    def session(self, name):
        return self.client_for(name).session(name)

    def create(self, name, optimizer, **kw):
        c = self.router or self.home(name)
        s = c.create(name, optimizer, **kw)
        if self.router is None:
            with self._lock:
                self._where[name] = c
        return s

    def fork(self, name, source, hyperparams=None):
        """Copies ``source`` (params, state, step) to a new session ``name``,
        through a checkpoint: the two may live on different shards."""
        ck = self.checkpoint(source)
        if hyperparams:
            hp = dict(ck.get("hyperparams") or {})
            hp.update(hyperparams)
            ck["hyperparams"] = hp
        c = self.router or self.home(name)
        c.restore(name, ck)
        with self._lock:
            if self.router is None:
                self._where[name] = c
        return c.get(name)

    def get(self, name):
        return self._call("get", name)

    def step(self, name, grad, **kw):
        return self._call("step", name, grad, **kw)

    def params(self, name, **kw):
        return self._call("params", name, **kw)

    def checkpoint(self, name):
        return self._call("checkpoint", name)

    def restore(self, name, checkpoint, if_match=None):
        c = self.router or (self.client_for(name))
        return c.restore(name, checkpoint, if_match=if_match)

    def patch(self, name, hyperparams=None, **fields):
        return self._call("patch", name, hyperparams, **fields)

    def delete(self, name, missing_ok=False):
        try:
            return self._call("delete", name, missing_ok=missing_ok)
        finally:
            with self._lock:
                self._where.pop(name, None)

    def history(self, name, **kw):
        return self._call("history", name, **kw)

    def optimizers(self):
        return (self.router or self.shards[0]).optimizers()

    def close(self):
        for c in self.shards + ([self.router] if self.router else []):
            c.close()
