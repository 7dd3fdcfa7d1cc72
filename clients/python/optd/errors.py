"""Errors raised by the optd client.

Every error the daemon returns is a JSON body
``{"error": {"code": "...", "message": "..."}}``; the client raises it as an
:class:`OptdError` subclass chosen by the code (or, failing that, the status),
carrying ``.status``, ``.code``, ``.message`` and the whole ``.body``.
"""


class OptdError(Exception):
    """Base of every error the client raises."""

    status = None  # class default, for except clauses that test it
    default_code = None

    def __init__(self, message, status=None, code=None, body=None, headers=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.code = code if code is not None else self.default_code
        self.body = body if body is not None else {}
        self.headers = headers or {}

    def __str__(self):
        if self.status is None:
            return self.message
        return "%s %s: %s" % (self.status, self.code, self.message)


class BadRequest(OptdError):
    """400 ``bad_json`` / ``bad_request``: the request is malformed."""

    status = 400
    default_code = "bad_request"


class Unauthorized(OptdError):
    """401: a token is configured and the request lacks it (or it is wrong)."""

    status = 401
    default_code = "unauthorized"


class NotFound(OptdError):
    """404: unknown session or path."""

    status = 404
    default_code = "not_found"


class MethodNotAllowed(OptdError):
    """405: known path, wrong method."""

    status = 405
    default_code = "method_not_allowed"


class Conflict(OptdError):
    """409 ``already_exists``: the session name is taken."""

    status = 409
    default_code = "already_exists"


AlreadyExists = Conflict


class StepMismatch(OptdError):
    """412: ``If-Match`` named another step; ``.current_step`` is the session's."""

    status = 412
    default_code = "step_mismatch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        err = self.body.get("error", {}) if isinstance(self.body, dict) else {}
        step = err.get("step")
        self.current_step = step if isinstance(step, int) else None


class TooLarge(OptdError):
    """413: the body is over the daemon's ``--max-body``."""

    status = 413
    default_code = "too_large"


class UnsupportedMediaType(OptdError):
    """415: a Content-Type other than JSON or octet-stream."""

    status = 415
    default_code = "unsupported_media_type"


class Invalid(OptdError):
    """422: well-formed but meaningless (the sharper code is in ``.code``)."""

    status = 422
    default_code = "invalid"


class SizeMismatch(Invalid):
    default_code = "size_mismatch"


class NonFinite(Invalid):
    default_code = "non_finite"


class UnknownOptimizer(Invalid):
    default_code = "unknown_optimizer"


class BadHyperparam(Invalid):
    default_code = "bad_hyperparam"


class UnknownField(Invalid):
    """A field the request does not take (a typo, or a hyperparameter given
    beside ``hyperparams``): the message names it and the nearest valid one."""

    default_code = "unknown_field"


class IdempotencyMismatch(Invalid):
    """A key was reused with a different gradient."""

    default_code = "idempotency_mismatch"


class Unavailable(OptdError):
    """503: storage failure or shutting down; safe to retry (the client already
    retried it ``retries`` times)."""

    status = 503
    default_code = "unavailable"


class RoundTimeout(Unavailable):
    """503 ``round_timeout``: a worker round did not fill in time; nothing changed."""

    default_code = "round_timeout"


class ConnectionFailed(Unavailable, ConnectionError):
    """The daemon could not be reached (or the connection broke) after every
    retry. ``.status`` is None. For a step sent with an Idempotency-Key it is
    safe to send it again with the same key."""

    status = None
    default_code = "connection_failed"


_BY_CODE = {
    "bad_json": BadRequest,
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "already_exists": Conflict,
    "step_mismatch": StepMismatch,
    "too_large": TooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "invalid": Invalid,
    "size_mismatch": SizeMismatch,
    "non_finite": NonFinite,
    "unknown_optimizer": UnknownOptimizer,
    "bad_hyperparam": BadHyperparam,
    "unknown_field": UnknownField,
    "idempotency_mismatch": IdempotencyMismatch,
    "unavailable": Unavailable,
    "round_timeout": RoundTimeout,
}

_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    412: StepMismatch,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: Invalid,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_for(status, body, headers=None):
    """Builds the exception for an error reply (body: parsed JSON or raw bytes)."""
    code = message = None
    parsed = body if isinstance(body, dict) else {}
    err = parsed.get("error") if isinstance(parsed.get("error"), dict) else None
    if err is not None:
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = err.get("message") if isinstance(err.get("message"), str) else None
    if message is None:
        if isinstance(body, (bytes, bytearray)):
            message = bytes(body[:200]).decode("utf-8", "replace").strip() or "HTTP %d" % status
        else:
            message = "HTTP %d" % status
    cls = _BY_CODE.get(code)
    # a code we do not know falls back on the status (subclass must agree with it)
    if cls is None or (cls.status is not None and cls.status != status):
        cls = _BY_STATUS.get(status, OptdError)
    return cls(message, status=status, code=code, body=parsed, headers=headers)
