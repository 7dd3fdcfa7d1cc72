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

The session is shaped like the model: one tensor per parameter (named after
``model.named_parameters()`` when those are given, else ``p0``, ``p1``, ...)
in torch's parameter groups, each group with its own hyperparameters. A
parameter whose ``.grad`` is None at ``step()`` is skipped, as torch skips
it: its values and state stay and its own step count does not move. When the
session does not exist it is created from the parameters' current values;
when it exists (a restarted job, or another worker created it) the
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
import re
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

# Hyperparameters of the whole session, not of a group (API.md "Tensors and
# parameter groups"): every torch group shows the session's value.
SESSION_WIDE = ("lr_schedule", "max_grad_norm")

_NAME_OK = re.compile(r"[A-Za-z0-9._/-]{1,255}\Z")


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


def _split_names(group):
    """A torch param group whose ``params`` may be (name, tensor) pairs (from
    ``named_parameters()``): (the group with tensors only, their names or
    None each)."""
    ps = group["params"]
    ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
    names, tensors = [], []
    for item in ps:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names.append(item[0])
            tensors.append(item[1])
        else:
            names.append(None)
            tensors.append(item)
    return dict(group, params=tensors), names


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
        return self._data().get(i, {})

    def __iter__(self):
        data = self._data()
        return iter([p for i, p in enumerate(self._opt._params) if data.get(i)])

    def __len__(self):
        return sum(1 for st in self._data().values() if st)

    def __repr__(self):
        return "<optd state view of session %r at step %s>" % (self._opt.session_name, self._opt.last_step)


class RemoteOptimizer(torch.optim.Optimizer):
    """An optimizer that runs in optd.

    ``params``: the tensors, ``model.named_parameters()`` (the names become
    the session's tensor names), or torch's list of parameter groups (dicts
    whose ``params`` are either, with their own hyperparameters).
    ``session``: the session name. ``url``/``token`` or a ready ``client`` (an ``optd.Client`` or
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

    ``defaults`` and every parameter group carry every hyperparameter of
    the session (defaults included), so ``torch.optim.lr_scheduler`` works
    (OneCycleLR, CyclicLR ...): a changed ``lr`` travels with the next step
    (header ``Optd-Lr``, per group), any other value changed is sent with
    ``PATCH`` (per group) before it, and only when it changed.
    A parameter whose ``.grad`` is None at ``step()`` is skipped, as torch
    skips it.
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
        if isinstance(params, torch.Tensor) or not params:
            raise TypeError("params is an iterable of tensors, of (name, tensor) or of groups, not empty")
        groups_in = params if isinstance(params[0], dict) else [{"params": params}]
        groups, names = [], []
        for g in groups_in:
            g, n = _split_names(g)
            groups.append(g)
            names.extend(n)
        # what this job asks for, per group; the rest is the session's
        self._asked = [{k: _norm(v) for k, v in g.items() if k != "params" and k not in IGNORED_FLAGS}
                       for g in groups]
        for g in groups:
            for k in IGNORED_FLAGS:
                g.pop(k, None)
        defaults = {k: _torchish(v) for k, v in self._catalog.defaults(optimizer).items()}
        defaults.update(hyperparams)
        self._building = True
        super().__init__(groups, defaults)
        self._building = False
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        for p in self._params:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
        self._names = self._fill_names(names)
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
        self._warned_flat = False
        size = sum(p.numel() for p in self._params)
        wanted = {k: _norm(v) for k, v in hyperparams.items()}
        fields = {k: v for k, v in (("workers", workers), ("min_workers", min_workers),
                                    ("round_timeout", round_timeout)) if v is not None}

        created = False
        try:
            info = self.client.get(session)
        except NotFound:
            flat = self._flat([p.detach() for p in self._params])
            try:
                info = self.client.create(session, optimizer, params=flat, hyperparams=wanted,
                                          dtype=self.dtype, groups=self._group_specs(), **fields)
                created = True
            except Conflict:  # another worker created it meanwhile: join it
                info = self.client.get(session)
        if info.size != size:
            raise ValueError("session %r has %d parameters, these tensors %d" % (session, info.size, size))
        if info.optimizer != optimizer:
            raise ValueError("session %r runs %s, not %s" % (session, info.optimizer, optimizer))
        if info.dtype != self.dtype:
            raise ValueError("session %r is %s, not %s" % (session, info.dtype, self.dtype))
        self._check_shape(info)
        if not created:  # an existing session takes the values asked for now
            patch = self._patch_body(info, wanted)
            moved = {k: v for k, v in fields.items() if info.info.get(k) != v}
            if patch or moved:
                body = dict(patch)
                hp = body.pop("hyperparams", None)
                info = self.client.patch(session, hp, **dict(body, **moved))
            self.load_remote_params()  # resume: the daemon's values win
        self._bind(info)
        self.last_step = info.current_step

    # -- the session's shape -----------------------------------------------
    def _fill_names(self, names):
        """Tensor names: those given, ``p<i>`` for the others."""
        taken = set(n for n in names if n is not None)
        out = []
        for i, n in enumerate(names):
            if n is None:
                n = "p%d" % i
                while n in taken:
                    n = "_" + n
                taken.add(n)
            if not _NAME_OK.match(n):
                raise ValueError("tensor name %r: a session's tensor names are [A-Za-z0-9._/-]{1,255}" % n)
            out.append(n)
        if len(set(out)) != len(out):
            dup = sorted(n for n in set(out) if out.count(n) > 1)
            raise ValueError("tensor names must be unique; %s appear twice" % ", ".join(dup))
        return out

    def _group_specs(self, groups=None, names=None, asked=None):
        """The create body's ``groups``: each group's tensors (name, shape) and
        the hyperparameters asked for it."""
        groups = self.param_groups if groups is None else groups
        names = self._names if names is None else names
        asked = self._asked if asked is None else asked
        out, i = [], 0
        for g, a in zip(groups, asked):
            spec = {"tensors": [{"name": names[i + j], "shape": list(p.shape)} for j, p in enumerate(g["params"])]}
            i += len(g["params"])
            hp = {k: v for k, v in a.items() if k not in SESSION_WIDE}
            if hp:
                spec["hyperparams"] = hp
            out.append(spec)
        return out

    def _check_shape(self, info):
        """That the session's tensors are these parameters; takes the
        session's tensor names (its layout wins where only names differ)."""
        sgroups = info.info.get("groups")
        self._shaped = sgroups is not None
        if not self._shaped:  # a session of one flat tensor, made before groups
            if len(self.param_groups) != 1:
                raise ValueError("session %r is one flat tensor with one set of hyperparameters; it cannot "
                                 "take %d parameter groups" % (info.name, len(self.param_groups)))
            return
        if len(sgroups) != len(self.param_groups):
            raise ValueError("session %r has %d parameter groups, this optimizer %d"
                             % (info.name, len(sgroups), len(self.param_groups)))
        names = []
        for gi, (sg, g) in enumerate(zip(sgroups, self.param_groups)):
            ts = sg.get("tensors", [])
            if len(ts) != len(g["params"]):
                raise ValueError("session %r's group %d has %d tensors, this optimizer's %d"
                                 % (info.name, gi, len(ts), len(g["params"])))
            for t, p in zip(ts, g["params"]):
                if list(t["shape"]) != list(p.shape):
                    raise ValueError("session %r's tensor %s is %s, this parameter %s"
                                     % (info.name, t["name"], t["shape"], list(p.shape)))
                names.append(t["name"])
        self._names = names

    def _patch_body(self, info, wanted):
        """The PATCH that gives an existing session the values asked for now
        (keyword hyperparameters for every group, a group's own for it)."""
        body = {}
        sw = {k: v for k, v in wanted.items() if k in SESSION_WIDE}
        sw = {k: v for k, v in sw.items() if _norm(info.hyperparams.get(k)) != v}
        if not self._shaped:
            hp = {k: v for k, v in wanted.items() if _norm(info.hyperparams.get(k)) != v}
            hp.update({k: v for k, v in self._asked[0].items() if _norm(info.hyperparams.get(k)) != v})
            return {"hyperparams": hp} if hp else {}
        per, any_group = [], False
        for sg, a in zip(info.info["groups"], self._asked):
            want = {k: v for k, v in wanted.items() if k not in SESSION_WIDE}
            want.update({k: v for k, v in a.items() if k not in SESSION_WIDE})
            have = sg.get("hyperparams") or {}
            d = {k: v for k, v in want.items() if _norm(have.get(k)) != v}
            any_group = any_group or bool(d)
            per.append(d)
        if len(per) == 1:  # the session's own values are its one group's
            sw.update(per[0])
            any_group = False
        if sw:
            body["hyperparams"] = sw
        if any_group:
            body["groups"] = [{"hyperparams": d} if d else {} for d in per]
        return body

    def _bind(self, info):
        """Puts the session's hyperparameters into the torch groups (every
        group holds the session-wide ones too) and remembers them as sent."""
        self.session = info
        self._sent = []
        sgroups = info.info.get("groups") if self._shaped else None
        for gi, g in enumerate(self.param_groups):
            hp = dict(info.hyperparams)
            if sgroups is not None:
                hp = {k: v for k, v in hp.items() if k in SESSION_WIDE}
                hp.update(sgroups[gi].get("hyperparams") or {})
            sent = {}
            for k, v in hp.items():
                g[k] = _torchish(v)
                sent[k] = _norm(v)
            self._sent.append(sent)
        self._state_cache = None

    def add_param_group(self, param_group):
        """torch's add_param_group (fine-tuning: unfreezing layers as a
        group of their own). Once the session exists, it takes the new
        tensors at their current values, with fresh state and step counts
        of 0, by a conditional PUT .../state of the session with them added."""
        if getattr(self, "_building", False):
            return super().add_param_group(param_group)
        if not self._shaped:
            raise ValueError("session %r is one flat tensor (made before groups): it cannot take more "
                             "tensors" % self.session_name)
        group, names = _split_names(param_group)
        asked = {k: _norm(v) for k, v in group.items() if k != "params" and k not in IGNORED_FLAGS}
        for k in IGNORED_FLAGS:
            group.pop(k, None)
        n0 = len(self._params)
        self._building = True
        try:
            super().add_param_group(group)
        finally:
            self._building = False
        added = self.param_groups[-1]
        try:
            new_names = self._fill_names(self._names + names)[n0:]
            ck = self.client.checkpoint(self.session_name)
            if ck.get("step") != self.last_step:
                raise StepMismatch("session %r moved to step %s since this optimizer last saw it at %s"
                                   % (self.session_name, ck.get("step"), self.last_step), status=412,
                                   code="step_mismatch")
            td = _TORCH_DTYPE[self.dtype]
            counts, spec, scalars = _TORCH_STATE.get(self._kind, (True, (), ()))
            flat_new = torch.from_numpy(self._flat([p.detach() for p in added["params"]])).tolist()
            n_new = len(flat_new)
            ck["params"] = list(ck["params"]) + flat_new
            ck.pop("size", None)
            hp_all = dict(ck.get("hyperparams") or {})
            hp_all.update(asked)
            for b in list((ck.get("state") or {})):
                if isinstance(ck["state"][b], list):
                    fill = hp_all.get("initial_accumulator_value", 0) if b == "sum" else 0
                    ck["state"][b] = list(ck["state"][b]) + [float(fill)] * n_new
            ts = dict(ck.get("tensor_state") or {})
            for n in new_names:
                ts[n] = {"step": 0}
                for sname in scalars:
                    ts[n][sname] = 1.0
            ck["tensor_state"] = ts
            spec_g = self._group_specs([added], new_names, [asked])[0]
            ck["groups"] = list(ck["groups"]) + [spec_g]
            self.client.restore(self.session_name, ck, if_match=self.last_step)
        except BaseException:
            self.param_groups.pop()
            raise
        self._params.extend(added["params"])
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._names.extend(new_names)
        self._asked.append(asked)
        self._bind(self.client.get(self.session_name))

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
        """PATCHes what a scheduler (or the user) changed in the groups since
        the last step, per group, but lr; nothing when nothing changed.
        Returns the lr the step is to set (the step's Optd-Lr: one number, or
        one per group of a shaped session with several), or None when no
        group's changed: a scheduler changes lr every step, and the step
        carries it without a round trip (the sent values are updated by
        _lr_sent once the step is applied)."""
        per, sw = [], {}
        lrs = [_norm(g.get("lr")) for g in self.param_groups]
        lr_changed = any(v != sent.get("lr", v) for v, sent in zip(lrs, self._sent))
        for g, sent in zip(self.param_groups, self._sent):
            changed = {}
            for k, old in sent.items():
                v = _norm(g.get(k))
                if k == "lr":
                    continue  # with the step
                if v != old:
                    if self._shaped and k in SESSION_WIDE:
                        sw[k] = v
                    else:
                        changed[k] = v
            per.append(changed)
        lr = None
        if lr_changed:
            lr = lrs if self._shaped and len(lrs) > 1 else lrs[0]
        if not any(per) and not sw:
            return lr
        if self._shaped and len(per) == 1:  # the session's own values are its one group's
            sw.update(per[0])
            self.client.patch(self.session_name, sw)
        elif self._shaped:
            groups = [{"hyperparams": d} if d else {} for d in per]
            self.client.patch(self.session_name, sw or None, **({"groups": groups} if any(per) else {}))
        else:
            self.client.patch(self.session_name, per[0])
        for sent, changed in zip(self._sent, per):
            sent.update(changed)
            sent.update(sw)
        return lr

    def _lr_sent(self, lr):
        """Records lr (as _push_hyperparams returned it) as the session's."""
        if lr is None:
            return
        for k, sent in enumerate(self._sent):
            if "lr" in sent:
                sent["lr"] = lr[k] if isinstance(lr, list) else lr

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
        lr = self._push_hyperparams()
        grads = []
        for p in self._params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported")
            grads.append(None if p.grad is None else p.grad.detach())
        self.send(grads, loss=report, weight=weight, idempotency_key=idempotency_key, if_match=if_match, lr=lr)
        self._lr_sent(lr)
        return closure_loss

    def send(self, grads, loss=None, weight=None, idempotency_key=None, if_match=None, lr=None):
        """One step with ``grads`` (tensors, one per parameter, in order; None
        for a parameter skipped, as torch skips one whose ``.grad`` is None)
        as the gradient instead of the parameters' ``.grad``: copies the new
        values into the parameters and returns the StepResult. Hyperparameter
        changes are not looked at (step() sends them); ``lr`` (a number, or
        one per group) is set with the step (the Optd-Lr header)."""
        skip = [self._names[i] for i, g in enumerate(grads) if g is None]
        if skip and not self._shaped:
            if not self._warned_flat:
                warnings.warn("session %r is one flat tensor (made before groups): parameters without a "
                              "gradient are stepped with zeros, unlike torch; load this optimizer's "
                              "state_dict() into a new session to skip them" % self.session_name)
                self._warned_flat = True
            skip = []
        td = _TORCH_DTYPE[self.dtype]
        grads = [torch.zeros(p.shape, dtype=td) if g is None else g for p, g in zip(self._params, grads)]
        r = self.client.step(self.session_name, self._wire(grads), loss=loss, weight=weight,
                             idempotency_key=idempotency_key, if_match=if_match,
                             wire_dtype=self.wire_dtype, reply_dtype=self.reply_dtype, skip=skip or None, lr=lr)
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
    def _tensor_steps(self, ck):
        """Each tensor's step count and scalar state in checkpoint ``ck`` (a
        tensor that tensor_state leaves out is at the session's step)."""
        step = int(ck.get("step", 0))
        ts = ck.get("tensor_state") or {}
        scal = {k: v for k, v in (ck.get("state") or {}).items() if not isinstance(v, list)}
        out = []
        for n in self._names:
            t = ts.get(n) or {}
            sc = dict(scal)
            sc.update({k: v for k, v in t.items() if k != "step"})
            out.append((int(t.get("step", step)), sc))
        return out

    def _torch_state(self):
        """(state by parameter index in torch's layout, checkpoint) of the
        session now; cached for the step last seen."""
        c = self._state_cache
        if c is not None and c[0] == self.last_step:
            return c[1], c[2]
        ck = self.client.checkpoint(self.session_name)
        counts, spec, scalars = _TORCH_STATE.get(self._kind, (True, (), ()))
        hps = self._group_hyperparams(ck)
        td = _TORCH_DTYPE[ck.get("dtype", self.dtype)]
        bufs = {k: torch.tensor(v, dtype=td) for k, v in (ck.get("state") or {}).items() if isinstance(v, list)}
        state, o = {}, 0
        for i, (p, (step, sc), hp) in enumerate(zip(self._params, self._tensor_steps(ck), hps)):
            n = p.numel()
            if step > 0 or self._kind == "Adagrad":  # torch keeps no state for a parameter never stepped
                st = {}
                if counts:
                    st["step"] = torch.tensor(float(step))
                for s in scalars:
                    if s in sc:
                        st[s] = torch.tensor(float(sc[s]), dtype=td)
                for name, used in spec:
                    if name in bufs and used(hp):
                        st[name] = bufs[name][o:o + n].view(p.shape).clone()
                    elif self._kind == "SGD" and name == "momentum_buffer":
                        st[name] = None  # torch.optim.SGD without momentum
                state[i] = st
            o += n
        step = int(ck.get("step", 0))
        self._state_cache = (step, state, ck) if step == self.last_step else None
        return state, ck

    def _group_hyperparams(self, ck):
        """Each parameter's full hyperparameters in checkpoint (or session
        JSON) ``ck``."""
        top = ck.get("hyperparams") or {}
        if not ck.get("groups"):
            return [top] * len(self._params)
        out = []
        for g in ck["groups"]:
            hp = dict(top)
            hp.update(g.get("hyperparams") or {})
            out.extend([hp] * len(g.get("tensors", [])))
        return out

    def state_dict(self):
        """The optimizer state as torch.optim lays it out, read from the
        session: ``state`` (parameter index -> ``{"step": ..., "exp_avg":
        ...}``, tensors of the session's dtype shaped like the parameters;
        each tensor's own step count; none for a parameter never stepped),
        ``param_groups`` (every hyperparameter, ``params`` as indices), and
        ``optd``: the session's ``session`` name, ``optimizer``, ``dtype``,
        ``step``, ``hyperparams``, tensor ``names`` and ``params`` (a flat
        tensor: a rollback does not depend on the model being loaded
        first). ``torch.save`` it; :meth:`load_state_dict` or
        ``torch.optim.<Class>.load_state_dict`` take it back."""
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
                "hyperparams": ck.get("hyperparams"), "names": list(self._names),
                "params": torch.tensor(ck["params"], dtype=td)}
        for k in SESSION_FIELDS:
            if k in ck:
                meta[k] = ck[k]
        return {"state": state, "param_groups": groups, "optd": meta}

    def load_state_dict(self, state_dict):
        """Replaces the session's params, state, step counts and
        hyperparameters (PUT .../state, conditional on the step this
        optimizer last saw) with those of ``state_dict``: one from
        :meth:`state_dict` (a rollback), or one a ``torch.optim`` optimizer of
        the same algorithm saved (a migration; its params are the
        parameters' current values, so load the model first). Raises
        ValueError, changing nothing, for what the session cannot hold."""
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
        saved = state_dict["param_groups"]
        for g, sg in zip(self.param_groups, saved):
            params = g["params"]
            g.clear()
            g.update({k: v for k, v in sg.items() if k != "params"})
            g["params"] = params
        self._check_shape(info)
        self._bind(info)
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
                and all(same(now["state"][k], v) for k, v in ck["state"].items())
                and [t[0] for t in self._tensor_steps(now)] == [t[0] for t in self._tensor_steps(ck)])

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
        # hyperparameters: the session's, then what the saved groups say
        group_hp = []
        for sent, sg in zip(self._sent, saved):
            hp = dict(sent)
            hp.update({k: _norm(v) for k, v in sg.items() if k in self._hp_names})
            group_hp.append(hp)
        counts, spec, scalars = _TORCH_STATE.get(self._kind, (True, (), ()))
        known = set(name for name, _ in spec) | set(scalars) | {"step"}
        saved_ids = [k for sg in saved for k in sg["params"]]
        per_param_hp = [hp for g, hp in zip(self.param_groups, group_hp) for _ in g["params"]]
        used_any = set(name for name, need in spec if any(need(hp) for hp in group_hp))
        st_all = sd["state"]
        steps, bufs, scal = [], {b: [] for b in used_any}, []
        for sid, p, hp in zip(saved_ids, self._params, per_param_hp):
            st = st_all.get(sid, {}) or {}
            extra = sorted(k for k in st if k not in known)
            if extra:
                raise ValueError("state[%r] has %s, which %s does not keep" % (sid, ", ".join(extra), opt))
            fresh = not st or (counts and _int_step(st.get("step", 0)) == 0)
            steps.append(_int_step(st["step"]) if counts and "step" in st else (0 if fresh else None))
            for b in used_any:
                v = st.get(b)
                if v is None:
                    if not fresh and dict(spec)[b](hp):
                        raise ValueError("state[%r] has no %s, which %s needs with %s"
                                         % (sid, b, opt, _why(b, hp)))
                    fill = hp.get("initial_accumulator_value", 0) if b == "sum" else 0
                    v = torch.full(p.shape, float(fill), dtype=torch.float64)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                    raise ValueError("state[%r][%r] has shape %s; its parameter is %s"
                                     % (sid, b, tuple(getattr(v, "shape", ())), tuple(p.shape)))
                bufs[b].append(v)
            scal.append({s: float(st[s]) for s in scalars if s in st})
        if not counts:  # torch.optim.SGD counts no steps: its buffers mean one was taken
            steps = [0 if s == 0 else None for s in steps]
        stepped = [s for s in steps if s is not None]
        step = int(meta["step"]) if "step" in meta else max(stepped + [1 if None in steps else 0])
        steps = [step if s is None else s for s in steps]
        if not self._shaped:
            if len(set(steps)) > 1:
                raise ValueError("the parameters have different step counts (%s), but session %r is one flat "
                                 "tensor (made before groups) with one" % (sorted(set(steps)), self.session_name))
            for s in scalars:
                vals = set(x.get(s, 1.0) for x in scal)
                if step and len(vals) > 1:
                    raise ValueError("the parameters have different %s (%s), but session %r is one flat tensor"
                                     % (s, sorted(vals), self.session_name))
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
        info = self.session.info or {}
        top = dict(info.get("hyperparams") or {})
        top.update(group_hp[0])  # the session's values are its first group's
        ck = {"name": self.session_name, "optimizer": opt, "dtype": self.dtype, "step": step,
              "params": flat.to(td).tolist(), "state": {b: vec(v) for b, v in bufs.items()}}
        if self._shaped:
            ck["hyperparams"] = top
            ck["groups"] = []
            i = 0
            for g, hp in zip(self.param_groups, group_hp):
                ck["groups"].append({"hyperparams": {k: v for k, v in hp.items() if k not in SESSION_WIDE},
                                     "tensors": [{"name": self._names[i + j], "shape": list(p.shape)}
                                                 for j, p in enumerate(g["params"])]})
                i += len(g["params"])
            ck["tensor_state"] = {}
            for n, s, sc in zip(self._names, steps, scal):
                t = {"step": s}
                for sname in scalars:
                    t[sname] = sc.get(sname, 1.0)
                ck["tensor_state"][n] = t
        else:
            ck["hyperparams"] = top
            for sname in scalars:
                ck["state"][sname] = scal[0].get(sname, 1.0) if scal else 1.0
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
