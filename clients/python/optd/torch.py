"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose parameters' optimizer
state lives in an optd session.

    import optd.torch
    opt = optd.torch.RemoteOptimizer(model.parameters(), session="run-1",
                                     url="http://127.0.0.1:8080", optimizer=torch.optim.Adam, lr=1e-3)
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)        # sends the flattened gradient, copies back the new values

The session holds every parameter as one flat vector in the order of
``params``. When it does not exist it is created from the parameters' current
values; when it exists (a restarted job, or another worker created it) the
parameters are loaded from it.

Resuming a job where its session is (the session keeps params, optimizer
state and step; the job keeps its data order and its torch schedulers)::

    opt = optd.torch.RemoteOptimizer(model.parameters(), session="run-1", url=url, lr=base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    opt.fast_forward(sched)                      # the scheduler catches up with opt.last_step
    for step in range(opt.last_step, total_steps):
        x, y = batch(step)                       # the data loop starts where the session is
        ...

Checkpoints in torch's own form: ``opt.state_dict()`` holds the optimizer
state as torch lays it out (``state[i]["exp_avg"]``, ``state[i]["step"]``),
the groups, and under ``"optd"`` the session's name, step and params, so
``torch.save``/``torch.load`` and ``load_state_dict`` roll the session back;
``load_state_dict`` also takes a state_dict saved by ``torch.optim`` itself.
"""

import math
import warnings
from collections.abc import Mapping

import torch

from .client import Client
from .errors import Conflict, NotFound, StepMismatch

__all__ = ["RemoteOptimizer", "DiLoCo"]

_TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}
_TORCH_WIRE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
               "float64": torch.float64}

# torch's implementation choices, not its maths: accepted and ignored
IGNORED_FLAGS = ("foreach", "fused", "capturable", "differentiable")

# Session fields (beside the hyperparams) a RemoteOptimizer passes through.
SESSION_FIELDS = ("workers", "min_workers", "round_timeout")


def _always(hp):
    return True


# The per-parameter state torch.optim keeps, by class: whether it counts
# steps (state["step"]), its buffers (each with the configurations that use
# it) and its scalar state. SGD keeps state["momentum_buffer"] = None without
# momentum, and Adagrad fills its state at construction (step 0).
_TORCH_STATE = {
    "SGD": (False, (("momentum_buffer", lambda hp: hp.get("momentum", 0) != 0),), ()),
    "Adam": (True, (("exp_avg", _always), ("exp_avg_sq", _always),
                    ("max_exp_avg_sq", lambda hp: bool(hp.get("amsgrad")))), ()),
    "AdamW": (True, (("exp_avg", _always), ("exp_avg_sq", _always),
                     ("max_exp_avg_sq", lambda hp: bool(hp.get("amsgrad")))), ()),
    "Adamax": (True, (("exp_avg", _always), ("exp_inf", _always)), ()),
    "NAdam": (True, (("exp_avg", _always), ("exp_avg_sq", _always)), ("mu_product",)),
    "Adagrad": (True, (("sum", _always),), ()),
    "Adadelta": (True, (("square_avg", _always), ("acc_delta", _always)), ()),
    "RMSprop": (True, (("square_avg", _always), ("momentum_buffer", lambda hp: hp.get("momentum", 0) > 0),
                       ("grad_avg", lambda hp: bool(hp.get("centered")))), ()),
}


def _norm(v):
    """Hyperparameter values compared and sent as JSON sees them."""
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _torchish(v):
    return tuple(v) if isinstance(v, list) else v


def _int_step(v):
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


class _Catalog:
    """GET /v1/optimizers, as a RemoteOptimizer needs it: the algorithms,
    their torch class, hyperparameter defaults and state buffers."""

    def __init__(self, client):
        self.algos = {}
        for o in client.optimizers():
            self.algos[o["name"]] = o

    def resolve(self, optimizer):
        """optd's name for ``optimizer``: optd's own (``"adam"``), torch's
        (``"Adam"``, ``"torch.optim.Adam"``) or torch's class."""
        if isinstance(optimizer, type):
            wanted = optimizer.__name__
        elif isinstance(optimizer, str):
            if optimizer in self.algos:
                return optimizer
            wanted = optimizer.rsplit(".", 1)[-1]
        else:
            raise TypeError("optimizer is a name (\"adam\", \"Adam\") or a torch.optim class, not %r"
                            % (optimizer,))
        if wanted.lower() in self.algos:
            return wanted.lower()
        for name, o in self.algos.items():  # the first optd algorithm of that torch class
            if o.get("torch", "").rsplit(".", 1)[-1] == wanted:
                return name
        raise ValueError("optd has no %s; it runs %s" % (wanted, ", ".join(
            "%s (%s)" % (n, o.get("torch", "?")) for n, o in self.algos.items())))

    def defaults(self, name):
        return {h["name"]: h.get("default") for h in self.algos[name]["hyperparams"]}

    def torch_class(self, name):
        return self.algos[name].get("torch", "").rsplit(".", 1)[-1]

    def foreign_hyperparams(self, name):
        """Hyperparameter names of other algorithms that ``name`` lacks."""
        mine = set(self.defaults(name))
        return {h["name"] for o in self.algos.values() for h in o["hyperparams"]} - mine


class _StateView(Mapping):
    """``opt.state``: parameter -> its state in torch's layout, read from the
    session (GET .../state) once per step seen. Read only."""

    def __init__(self, opt):
        self._opt = opt

    def _data(self):
        return self._opt._torch_state()[0]

    def __getitem__(self, p):
        i = self._opt._index.get(id(p))
        if i is None or self._opt._params[i] is not p:
            raise KeyError("not a parameter of this optimizer")
        return self._data()[i]

    def __iter__(self):
        data = self._data()
        return iter([p for i, p in enumerate(self._opt._params) if data[i]])

    def __len__(self):
        return sum(1 for st in self._data().values() if st)

    def __repr__(self):
        return "<optd state view of session %r at step %s>" % (self._opt.session_name, self._opt.last_step)


class RemoteOptimizer(torch.optim.Optimizer):
    """An optimizer that runs in optd.

    ``params``: the tensors (one parameter group). ``session``: the session
    name. ``url``/``token`` or a ready ``client`` (an ``optd.Client`` or
    ``optd.ShardedClient``); ``retries``, ``backoff``, ``max_backoff`` and
    ``timeout`` configure the client made from ``url``.
    ``optimizer``: optd's name (``"adam"``, ``"nag"``, ...), torch's
    (``"Adam"``) or torch's class (``torch.optim.Adam``). ``dtype``:
    ``float32``/``float64`` (default: the parameters'). ``workers``,
    ``min_workers``, ``round_timeout``: the session's worker rounds (the
    first worker creates the session with them, the others join).
    ``wire_dtype="bfloat16"`` (or ``"float16"``) sends the gradients in that
    type and gets the params back in it, halving the bytes each way of a
    float32 session (the session still computes in its dtype);
    ``reply_dtype`` sets the params' type apart (e.g. the session's). Other
    keyword arguments are hyperparameters by PyTorch's names (``lr=``,
    ``betas=``, ``momentum=``, ``lr_schedule=`` ...); ``foreach``, ``fused``,
    ``capturable`` and ``differentiable`` are accepted and ignored (they
    choose torch's implementation, not its maths).

    ``defaults`` and the parameter group carry every hyperparameter of the
    session (defaults included), so ``torch.optim.lr_scheduler`` works
    (OneCycleLR, CyclicLR ...): a value a scheduler changed is sent with
    ``PATCH`` before the next step, and only when it changed.
    """

    def __init__(self, params, session, url=None, client=None, optimizer="adam", dtype=None,
                 token=None, timeout=None, workers=None, min_workers=None, round_timeout=None,
                 wire_dtype=None, reply_dtype=None, retries=None, backoff=None, max_backoff=None,
                 **hyperparams):
        self.ignored = {k: hyperparams.pop(k) for k in IGNORED_FLAGS if k in hyperparams}
        if client is None:
            kw = {k: v for k, v in (("retries", retries), ("backoff", backoff), ("max_backoff", max_backoff))
                  if v is not None}
            t = 60.0 if timeout is None else timeout
            if timeout is None and workers is not None and workers > 1:
                t = max(t, (round_timeout or 60) + 30)  # a contribution waits for its round
            client = Client(url, token=token, timeout=t, **kw)
        self.client = client
        self._catalog = _Catalog(client)
        optimizer = self._catalog.resolve(optimizer)
        self.remote_optimizer = optimizer
        self._hp_names = tuple(self._catalog.defaults(optimizer))
        self._kind = self._catalog.torch_class(optimizer)

        params = list(params)
        explicit = dict(hyperparams)  # what this job asks for; the rest is the session's
        if params and isinstance(params[0], dict):
            for g in params:
                explicit.update({k: v for k, v in g.items() if k != "params" and k not in IGNORED_FLAGS})
        defaults = {k: _torchish(v) for k, v in self._catalog.defaults(optimizer).items()}
        defaults.update(hyperparams)
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        if len(self.param_groups) != 1:
            raise ValueError("RemoteOptimizer takes one parameter group (the session has one "
                             "set of hyperparameters)")
        self._params = list(self.param_groups[0]["params"])
        self._index = {id(p): i for i, p in enumerate(self._params)}
        for p in self._params:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
        if dtype is None:
            dtype = "float64" if self._params[0].dtype == torch.float64 else "float32"
        if str(dtype).replace("torch.", "") not in _TORCH_DTYPE:
            raise ValueError("dtype must be float32 or float64, not %r" % (dtype,))
        self.dtype = str(dtype).replace("torch.", "")
        for w in (wire_dtype, reply_dtype):
            if w is not None and str(w).replace("torch.", "") not in _TORCH_WIRE:
                raise ValueError("wire_dtype is one of %s, not %r" % (", ".join(_TORCH_WIRE), w))
        self.wire_dtype = None if wire_dtype is None else str(wire_dtype).replace("torch.", "")
        self.reply_dtype = None if reply_dtype is None else str(reply_dtype).replace("torch.", "")
        self.session_name = session
        self.last_step = None
        self.last_result = None
        self._state_cache = None
        size = sum(p.numel() for p in self._params)
        wanted = {k: _norm(v) for k, v in explicit.items()}
        fields = {k: v for k, v in (("workers", workers), ("min_workers", min_workers),
                                    ("round_timeout", round_timeout)) if v is not None}

        created = False
        try:
            info = self.client.get(session)
        except NotFound:
            flat = self._flat([p.detach() for p in self._params])
            try:
                info = self.client.create(session, optimizer, params=flat, hyperparams=wanted,
                                          dtype=self.dtype, **fields)
                created = True
            except Conflict:  # another worker created it meanwhile: join it
                info = self.client.get(session)
        if info.size != size:
            raise ValueError("session %r has %d parameters, these tensors %d" % (session, info.size, size))
        if info.optimizer != optimizer:
            raise ValueError("session %r runs %s, not %s" % (session, info.optimizer, optimizer))
        if info.dtype != self.dtype:
            raise ValueError("session %r is %s, not %s" % (session, info.dtype, self.dtype))
        if not created:  # an existing session takes the values asked for now
            changed = {k: v for k, v in wanted.items() if _norm(info.hyperparams.get(k)) != v}
            moved = {k: v for k, v in fields.items() if info.info.get(k) != v}
            if changed or moved:
                info = self.client.patch(session, changed or None, **moved)
            self.load_remote_params()  # resume: the daemon's values win
        self.session = info
        self._set_group(self.param_groups[0], info.hyperparams)
        self.last_step = info.current_step

    def _set_group(self, group, hyperparams):
        """Puts the session's hyperparameters into ``group`` and remembers
        them as sent."""
        self._sent = {}
        for k, v in hyperparams.items():
            group[k] = _torchish(v)
            self._sent[k] = _norm(v)

    def add_param_group(self, param_group):
        if not getattr(self, "_building", False):
            raise ValueError("RemoteOptimizer cannot take more parameters once its session exists")
        super().add_param_group(param_group)

    # -- opt.state: a read view of the session's state ----------------------
    @property
    def state(self):
        """The optimizer state per parameter, in torch's layout, as the
        session holds it (read only: use load_state_dict to change it)."""
        if getattr(self, "_params", None) is None:
            return {}
        return _StateView(self)

    @state.setter
    def state(self, value):
        pass  # torch.optim.Optimizer.__init__ sets an empty dict; the state lives in the session

    # -- vectors -----------------------------------------------------------
    def _flat(self, tensors):
        td = _TORCH_DTYPE[self.dtype]
        return torch.cat([t.reshape(-1).to(device="cpu", dtype=td) for t in tensors]).numpy()

    def _wire(self, tensors):
        """The flat gradient, numpy of the session's dtype: the client
        rounds it to a narrow wire type as torch's Tensor.to() does (through
        float32, to nearest even)."""
        return self._flat(tensors)

    @torch.no_grad()
    def _load(self, values):
        if isinstance(values, torch.Tensor):
            flat = values
        elif hasattr(values, "dtype"):  # numpy
            flat = torch.from_numpy(values)
        else:
            flat = torch.tensor(values, dtype=_TORCH_DTYPE[self.dtype])
        o = 0
        for p in self._params:
            n = p.numel()
            p.copy_(flat[o:o + n].view_as(p))
            o += n

    def load_remote_params(self):
        """Copies the session's current values into the parameters."""
        r = self.client.params(self.session_name, binary=True)
        self._load(r.params)
        self.last_step = r.step
        return r.step

    def _push_hyperparams(self):
        """PATCHes what a scheduler (or the user) changed in the group since
        the last step; nothing when nothing changed. The step body has no
        place for hyperparameters, so this is one extra round trip on the
        steps that change them."""
        group = self.param_groups[0]
        changed = {}
        for k, sent in self._sent.items():
            v = _norm(group.get(k))
            if v != sent:
                changed[k] = v
        if changed:
            self.client.patch(self.session_name, changed)
            self._sent.update(changed)

    # -- torch.optim.Optimizer ---------------------------------------------
    def step(self, closure=None, loss=None, weight=None, idempotency_key=None, if_match=None):
        """Sends the gradients (missing ones count as zero) as one step and
        copies the new values into the parameters. ``closure`` is evaluated
        first, as torch optimizers do; its value (or ``loss``) is reported
        with the step. ``weight`` weighs this contribution in a worker round
        (e.g. the batch size, for shards of unequal size). Returns the
        closure's loss."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        report = loss if loss is not None else closure_loss
        if isinstance(report, torch.Tensor):
            report = report.detach().item()
        self._push_hyperparams()
        grads = []
        for p in self._params:
            if p.grad is None:
                grads.append(torch.zeros(p.numel(), dtype=_TORCH_DTYPE[self.dtype]))
            elif p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported")
            else:
                grads.append(p.grad.detach())
        self.send(grads, loss=report, weight=weight, idempotency_key=idempotency_key, if_match=if_match)
        return closure_loss

    def send(self, grads, loss=None, weight=None, idempotency_key=None, if_match=None):
        """One step with ``grads`` (tensors, one per parameter, in order) as
        the gradient instead of the parameters' ``.grad``: copies the new
        values into the parameters and returns the StepResult. Hyperparameter
        changes are not looked at (step() sends them)."""
        r = self.client.step(self.session_name, self._wire(grads), loss=loss, weight=weight,
                             idempotency_key=idempotency_key, if_match=if_match,
                             wire_dtype=self.wire_dtype, reply_dtype=self.reply_dtype)
        self.last_result = r
        self.last_step = r.step
        if r.params is None:  # a replay too old for the daemon to keep its values
            self.load_remote_params()
        else:
            self._load(r.params)
        return r

    def fast_forward(self, *schedulers, steps=None):
        """Steps each torch scheduler made for this optimizer until its
        ``last_epoch`` is ``steps`` (default: ``last_step``, where the
        session is), as a resumed job must before its first step; returns
        that step. Schedulers stepped per epoch take ``steps=epoch``."""
        n = self.last_step if steps is None else steps
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore", UserWarning)
            for s in schedulers:
                if not hasattr(s, "last_epoch"):
                    raise TypeError("%s has no last_epoch to fast-forward" % type(s).__name__)
                while s.last_epoch < n:
                    s.step()
        return n

    # -- state in torch's layout -------------------------------------------
    def _torch_state(self):
        """(state by parameter index in torch's layout, checkpoint) of the
        session now; cached for the step last seen."""
        c = self._state_cache
        if c is not None and c[0] == self.last_step:
            return c[1], c[2]
        ck = self.client.checkpoint(self.session_name)
        counts, spec, scalars = _TORCH_STATE.get(self._kind, (True, (), ()))
        hp = ck.get("hyperparams") or {}
        td = _TORCH_DTYPE[ck.get("dtype", self.dtype)]
        bufs = {k: torch.tensor(v, dtype=td) for k, v in (ck.get("state") or {}).items() if isinstance(v, list)}
        step = int(ck.get("step", 0))
        state, o = {}, 0
        for i, p in enumerate(self._params):
            n = p.numel()
            st = {}
            if step > 0 or self._kind == "Adagrad":  # torch's state is empty until a step
                if counts:
                    st["step"] = torch.tensor(float(step))
                for s in scalars:
                    st[s] = torch.tensor(float(ck["state"][s]), dtype=td)
                for name, used in spec:
                    if name in bufs and used(hp):
                        st[name] = bufs[name][o:o + n].view(p.shape).clone()
                    elif self._kind == "SGD" and name == "momentum_buffer":
                        st[name] = None  # torch.optim.SGD without momentum
            state[i] = st
            o += n
        self._state_cache = (step, state, ck) if step == self.last_step else None
        return state, ck

    def state_dict(self):
        """The optimizer state as torch.optim lays it out, read from the
        session: ``state`` (parameter index -> ``{"step": ..., "exp_avg":
        ...}``, tensors of the session's dtype shaped like the parameters),
        ``param_groups`` (every hyperparameter, ``params`` as indices), and
        ``optd``: the session's ``session`` name, ``optimizer``, ``dtype``,
        ``step``, ``hyperparams`` and ``params`` (a flat tensor: a rollback
        does not depend on the model being loaded first). ``torch.save`` it;
        :meth:`load_state_dict` or ``torch.optim.<Class>.load_state_dict``
        take it back."""
        self._state_cache = None  # a checkpoint is read now, not from a cache
        state, ck = self._torch_state()
        groups = []
        start = 0
        for g in self.param_groups:
            packed = {k: (list(v) if isinstance(v, list) else v) for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        td = _TORCH_DTYPE[ck.get("dtype", self.dtype)]
        meta = {"session": self.session_name, "optimizer": ck.get("optimizer", self.remote_optimizer),
                "dtype": ck.get("dtype", self.dtype), "step": int(ck.get("step", 0)),
                "hyperparams": ck.get("hyperparams"), "params": torch.tensor(ck["params"], dtype=td)}
        for k in SESSION_FIELDS:
            if k in ck:
                meta[k] = ck[k]
        return {"state": state, "param_groups": groups, "optd": meta}

    def load_state_dict(self, state_dict):
        """Replaces the session's params, state, step and hyperparameters
        (PUT .../state, conditional on the step this optimizer last saw) with
        those of ``state_dict``: one from :meth:`state_dict` (a rollback), or
        one a ``torch.optim`` optimizer of the same algorithm saved (a
        migration; its params are the parameters' current values, so load
        the model first, and torch.optim.SGD's, which counts no steps,
        resumes at step 1 once it has momentum buffers). Raises ValueError,
        changing nothing, for what the session cannot hold."""
        ck = self._checkpoint_from(state_dict)
        name = self.session_name
        try:
            self.client.restore(name, ck, if_match=self.last_step)
        except StepMismatch as e:
            if not self._holds(ck):  # else: another worker (or a lost reply's retry) restored this very state
                raise StepMismatch("session %r moved on (to step %s) since this optimizer last saw it at step %s; "
                                   "load_state_dict replaces a session only at the step it knows: call "
                                   "load_remote_params() and load again if it should win"
                                   % (name, getattr(e, "current_step", "?"), self.last_step),
                                   status=e.status, code=e.code, body=e.body) from None
        except NotFound:  # deleted meanwhile: the checkpoint creates it again
            self.client.restore(name, ck)
        info = self.client.get(name)
        self.session = info
        saved = state_dict["param_groups"]
        for g, sg in zip(self.param_groups, saved):
            params = g["params"]
            g.clear()
            g.update({k: v for k, v in sg.items() if k != "params"})
            g["params"] = params
            self._set_group(g, info.hyperparams)
        self._load(torch.tensor(ck["params"], dtype=_TORCH_DTYPE[self.dtype]))
        self.last_step = info.current_step
        self._state_cache = None

    def _holds(self, ck):
        """Whether the session holds exactly checkpoint ``ck`` now."""
        now = self.client.checkpoint(self.session_name)
        td = _TORCH_DTYPE[self.dtype]

        def same(a, b):
            if isinstance(a, list) or isinstance(b, list):
                return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                        and torch.equal(torch.tensor(a, dtype=td), torch.tensor(b, dtype=td)))
            return a == b
        return (now.get("step") == ck["step"] and same(now.get("params"), ck["params"])
                and set(now.get("state") or {}) == set(ck["state"])
                and all(same(now["state"][k], v) for k, v in ck["state"].items()))

    def _checkpoint_from(self, sd):
        """The PUT .../state body that holds torch state_dict ``sd``, or
        ValueError saying what in it the session cannot honour."""
        if not isinstance(sd, Mapping) or "param_groups" not in sd or "state" not in sd:
            raise ValueError("a state_dict is a dict with \"state\" and \"param_groups\" (from state_dict())")
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has %d parameter groups, this optimizer %d"
                             % (len(saved), len(self.param_groups)))
        for i, (g, sg) in enumerate(zip(self.param_groups, saved)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict's group %d has %d parameters, this optimizer's %d"
                                 % (i, len(sg["params"]), len(g["params"])))
        meta = sd.get("optd") or {}
        opt = self.remote_optimizer
        if meta.get("optimizer", opt) != opt:
            raise ValueError("this state_dict is of a %s session; session %r runs %s"
                             % (meta["optimizer"], self.session_name, opt))
        foreign = self._catalog.foreign_hyperparams(opt)
        for i, sg in enumerate(saved):
            bad = sorted(k for k in sg if k in foreign)
            if bad:
                raise ValueError("the state_dict's group %d has %s, which %s (torch.optim.%s) does not have: "
                                 "it is another optimizer's" % (i, ", ".join(bad), opt, self._kind))
        hp = {k: _norm(v) for k, v in self._sent.items()}
        hp.update({k: _norm(v) for k, v in saved[0].items() if k in self._hp_names})
        counts, spec, scalars = _TORCH_STATE.get(self._kind, (True, (), ()))
        used = [name for name, need in spec if need(hp)]
        known = set(name for name, _ in spec) | set(scalars) | {"step"}
        saved_ids = [k for sg in saved for k in sg["params"]]
        st_all = sd["state"]
        steps, bufs, scal = [], {b: [] for b in used}, {s: [] for s in scalars}
        for i, (sid, p) in enumerate(zip(saved_ids, self._params)):
            st = st_all.get(sid, {}) or {}
            extra = sorted(k for k in st if k not in known)
            if extra:
                raise ValueError("state[%r] has %s, which %s does not keep" % (sid, ", ".join(extra), opt))
            fresh = not st or (counts and _int_step(st.get("step", 0)) == 0)
            steps.append(_int_step(st["step"]) if counts and "step" in st else (0 if fresh else None))
            for b in used:
                v = st.get(b)
                if v is None:
                    if not fresh:
                        raise ValueError("state[%r] has no %s, which %s needs with %s"
                                         % (sid, b, opt, _why(b, hp)))
                    fill = hp.get("initial_accumulator_value", 0) if b == "sum" else 0
                    v = torch.full(p.shape, float(fill), dtype=torch.float64)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                    raise ValueError("state[%r][%r] has shape %s; its parameter is %s"
                                     % (sid, b, tuple(getattr(v, "shape", ())), tuple(p.shape)))
                bufs[b].append(v)
            for s in scalars:
                scal[s].append(float(st[s]) if s in st else 1.0)
        if counts:
            stepped = [s for s in steps if s is not None]
            if len(set(stepped)) > 1:
                raise ValueError("the parameters have different step counts (%s), but a session of one "
                                 "tensor has one" % sorted(set(stepped)))
            step = stepped[0] if stepped else 0
            for s, vals in scal.items():
                if step and len(set(vals)) > 1:
                    raise ValueError("the parameters have different %s (%s), but a session of one tensor has one"
                                     % (s, sorted(set(vals))))
        else:  # torch.optim.SGD counts no steps; its buffers mean one was taken
            if 0 in steps and None in steps:
                raise ValueError("some parameters have state and others none (never stepped), but a "
                                 "session of one tensor steps them all")
            step = 0 if 0 in steps else 1
        if "step" in meta:
            step = int(meta["step"])
        if "params" in meta:
            flat = torch.as_tensor(meta["params"]).reshape(-1)
            size = sum(p.numel() for p in self._params)
            if flat.numel() != size:
                raise ValueError("the state_dict's params have %d elements, these tensors %d" % (flat.numel(), size))
        else:
            flat = torch.from_numpy(self._flat([p.detach() for p in self._params]))
        td = _TORCH_DTYPE[self.dtype]

        def vec(ts):
            return torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=td) for t in ts]).tolist()
        ck = {"name": self.session_name, "optimizer": opt, "dtype": self.dtype, "hyperparams": hp,
              "step": step, "params": flat.to(td).tolist(), "state": {b: vec(v) for b, v in bufs.items()}}
        for s, vals in scal.items():
            ck["state"][s] = vals[0]
        info = self.session.info or {}
        for k in SESSION_FIELDS + ("min_workers_auto",):
            if k in info:
                ck[k] = info[k]
        for v in ck["state"].values():
            if isinstance(v, list) and not all(math.isfinite(x) for x in v):
                raise ValueError("the state_dict's state holds NaN or infinity")
        return ck


def _why(buffer, hp):
    return {"max_exp_avg_sq": "amsgrad=True", "momentum_buffer": "momentum=%s" % hp.get("momentum"),
            "grad_avg": "centered=True"}.get(buffer, "its configuration")


class DiLoCo:
    """DiLoCo's outer optimizer (Douillard et al. 2023, "DiLoCo: Distributed
    Low-Communication Training of Language Models") on an optd session.

    Each of ``workers`` processes trains its own replica of the model with a
    local (inner) torch optimizer; every ``sync_every`` local steps each sends
    its pseudo-gradient, the parameters before those steps minus after them,
    to a ``nag`` session (``lr=0.7``, ``momentum=0.9``) with ``workers=k``.
    The daemon averages the k pseudo-gradients (weighted by ``weight=``, e.g.
    the tokens each saw) and applies one Nesterov step; every worker then
    goes on from the new global params. Pseudo-gradients travel as bfloat16
    (``wire_dtype``); the params come back in the session's dtype.

        inner = torch.optim.AdamW(model.parameters(), lr=4e-4)
        outer = optd.torch.DiLoCo(model.parameters(), session="run-1", url=url, workers=k, sync_every=500)
        for step in range(outer.local_steps, total):   # a restarted worker goes on where the rounds are
            inner.zero_grad()
            loss_fn(model(x), y).backward()
            inner.step()
            outer.step()          # every sync_every calls: one outer round (waits for the k workers)

    The first worker creates the session from its parameters and the others
    join it (their parameters are replaced by the session's). Other keyword
    arguments go to the :class:`RemoteOptimizer` of the outer step
    (``client=``, ``token=``, ``round_timeout=``, ``min_workers=``, ...).
    """

    def __init__(self, params, session, workers, sync_every=500, url=None, lr=0.7, momentum=0.9,
                 wire_dtype="bfloat16", **kw):
        self.params = list(params)
        if sync_every < 1:
            raise ValueError("sync_every is a number of local steps, at least 1")
        self.outer = RemoteOptimizer(self.params, session, url=url, optimizer="nag", lr=lr, momentum=momentum,
                                     workers=workers, wire_dtype=wire_dtype, **kw)
        self.outer.reply_dtype = self.outer.dtype  # the global params in full
        self.sync_every = int(sync_every)
        self.local_steps = self.outer.last_step * self.sync_every
        self.last_pseudo_gradient = None
        self._before = [p.detach().clone() for p in self.params]

    @property
    def outer_steps(self):
        """The outer rounds applied (the session's step)."""
        return self.outer.last_step

    def step(self, weight=None, loss=None):
        """Counts one local step; every ``sync_every`` of them runs
        :meth:`sync` and returns its StepResult (else None)."""
        self.local_steps += 1
        if self.local_steps % self.sync_every:
            return None
        return self.sync(weight=weight, loss=loss)

    @torch.no_grad()
    def sync(self, weight=None, loss=None):
        """Sends this worker's pseudo-gradient (params at the last sync minus
        now) to the round and loads the new global params."""
        pseudo = [b - p.detach().to(b.dtype) for b, p in zip(self._before, self.params)]
        self.last_pseudo_gradient = pseudo
        r = self.outer.send(pseudo, weight=weight, loss=loss)
        self._before = [p.detach().clone() for p in self.params]
        return r
