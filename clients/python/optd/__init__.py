"""optd: a Python client for the optd optimizer-as-a-service daemon.

    import optd
    client = optd.Client("http://127.0.0.1:8080")
    s = client.create("run-1", "adam", params=[0.5, -1.25, 3.0], hyperparams={"lr": 0.01})
    step, params = s.step([0.1, -0.2, 0.3])

``optd.torch.RemoteOptimizer`` is a ``torch.optim.Optimizer`` whose state
lives in the daemon (``import optd.torch``; needs torch). ``optd.ShardedClient``
and ``optd.list_all`` work across several daemons behind a router.
"""

from .client import Client, ParamsResult, Session, StepResult
from .errors import (AlreadyExists, BadHyperparam, BadRequest, Conflict, ConnectionFailed,
                     IdempotencyMismatch, Invalid, MethodNotAllowed, NonFinite, NotFound,
                     OptdError, RoundTimeout, SizeMismatch, StepMismatch, TooLarge,
                     Unauthorized, UnknownField, UnknownOptimizer, Unavailable, UnsupportedMediaType)
from .sharded import ShardedClient, list_all
from . import safetensors

__version__ = "0.1.0"

__all__ = [
    "Client", "Session", "StepResult", "ParamsResult", "ShardedClient", "list_all",
    "OptdError", "BadRequest", "Unauthorized", "NotFound", "MethodNotAllowed", "Conflict",
    "AlreadyExists", "StepMismatch", "TooLarge", "UnsupportedMediaType", "Invalid",
    "SizeMismatch", "NonFinite", "UnknownOptimizer", "BadHyperparam", "UnknownField", "IdempotencyMismatch",
    "Unavailable", "RoundTimeout", "ConnectionFailed", "safetensors",
]
