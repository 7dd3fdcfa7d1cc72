"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose parameters' optimizer
state lives in an optd session.

    import optd.torch
    opt = optd.torch.RemoteOptimizer(model.parameters(), session="run-1",
                                     url="http://127.0.0.1:8080", optimizer="adam", lr=1e-3)
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)        # sends the flattened gradient, copies back the new values

The session holds every parameter as one flat vector in the order of
``params``. When it does not exist it is created from the parameters' current
values; when it exists (a restarted job) the parameters are loaded from it.
"""

import torch

from .client import Client
from .errors import Conflict, NotFound

__all__ = ["RemoteOptimizer"]

_TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}


def _norm(v):
    """Hyperparameter values compared and sent as JSON sees them."""
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _torchish(v):
    return tuple(v) if isinstance(v, list) else v


class RemoteOptimizer(torch.optim.Optimizer):
    """An optimizer that runs in optd.

    ``params``: the tensors (one parameter group: the session has one set of
    hyperparameters). ``session``: the session name. ``url``/``token`` or a
    ready ``client`` (an ``optd.Client`` or ``optd.ShardedClient``).
    ``optimizer``: optd's algorithm name (``adam``, ``sgd``, ``momentum``,
    ...). ``dtype``: ``float32``/``float64`` (default: the parameters').
    Other keyword arguments are the session's hyperparameters, by PyTorch's
    names (``lr=``, ``betas=``, ``momentum=``, ``lr_schedule=`` ...).

    The parameter group carries every hyperparameter of the session (defaults
    included), so ``torch.optim.lr_scheduler`` works: a changed value is sent
    with ``PATCH`` before the next step.
    """

    def __init__(self, params, session, url=None, client=None, optimizer="adam", dtype=None,
                 token=None, timeout=60.0, **hyperparams):
        super().__init__(params, dict(hyperparams))
        if len(self.param_groups) != 1:
            raise ValueError("RemoteOptimizer takes one parameter group (the session has one "
                             "set of hyperparameters)")
        self._params = list(self.param_groups[0]["params"])
        for p in self._params:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
        if dtype is None:
            dtype = "float64" if self._params[0].dtype == torch.float64 else "float32"
        if str(dtype).replace("torch.", "") not in _TORCH_DTYPE:
            raise ValueError("dtype must be float32 or float64, not %r" % (dtype,))
        self.dtype = str(dtype).replace("torch.", "")
        self.client = client if client is not None else Client(url, token=token, timeout=timeout)
        self.session_name = session
        self.remote_optimizer = optimizer
        self.last_step = None
        self.last_result = None
        size = sum(p.numel() for p in self._params)

        created = False
        try:
            info = self.client.get(session)
        except NotFound:
            flat = self._flat([p.detach() for p in self._params])
            try:
                info = self.client.create(session, optimizer, params=flat, hyperparams=hyperparams,
                                          dtype=self.dtype)
                created = True
            except Conflict:  # another worker created it meanwhile
                info = self.client.get(session)
        if info.size != size:
            raise ValueError("session %r has %d parameters, these tensors %d" % (session, info.size, size))
        if info.optimizer != optimizer:
            raise ValueError("session %r runs %s, not %s" % (session, info.optimizer, optimizer))
        if info.dtype != self.dtype:
            raise ValueError("session %r is %s, not %s" % (session, info.dtype, self.dtype))
        if hyperparams:  # an existing session takes the values asked for now
            changed = {k: _norm(v) for k, v in hyperparams.items()
                       if _norm(info.hyperparams.get(k)) != _norm(v)}
            if changed:
                info = self.client.patch(session, changed)
        if not created:  # resume: the daemon's values win
            self.load_remote_params()
        self.session = info
        group = self.param_groups[0]
        self._sent = {}
        for k, v in info.hyperparams.items():
            group[k] = _torchish(v)
            self._sent[k] = _norm(v)
        self.last_step = info.current_step

    def add_param_group(self, param_group):
        if getattr(self, "_params", None) is not None:
            raise ValueError("RemoteOptimizer cannot take more parameters once its session exists")
        super().add_param_group(param_group)

    # -- vectors -----------------------------------------------------------
    def _flat(self, tensors):
        td = _TORCH_DTYPE[self.dtype]
        return torch.cat([t.reshape(-1).to(device="cpu", dtype=td) for t in tensors]).numpy()

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
    def step(self, closure=None, loss=None, idempotency_key=None, if_match=None):
        """Sends the gradients (missing ones count as zero) as one step and
        copies the new values into the parameters. ``closure`` is evaluated
        first, as torch optimizers do; its value (or ``loss``) is reported
        with the step. Returns the closure's loss."""
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
        r = self.client.step(self.session_name, self._flat(grads), loss=report,
                             idempotency_key=idempotency_key, if_match=if_match)
        self.last_result = r
        self.last_step = r.step
        if r.params is None:  # a replay too old for the daemon to keep its values
            self.load_remote_params()
        else:
            self._load(r.params)
        return closure_loss
