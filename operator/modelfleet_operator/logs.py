"""Operator logging: one structured line per decision (JSON, or logfmt on a terminal), kopf's noise turned down."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]

# Attributes every LogRecord has: anything else on a record came from `extra=` and is a field of the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# kopf's per-object logger attaches the object it is about; its fields become ours.
_KOPF_REF = "k8s_ref"
_KOPF_FIELDS = {"k8s_ref", "k8s_skip", "settings"}
# "Request attempt #3/9 failed; will retry: GET https://... -> ClientConnectorError(...)" (kopf's API client).
# "... failed; TCP closed; will re-authenticate: ..." (its session closed, on shutdown say) is kept as it is rare.
_KOPF_RETRY = re.compile(r"^Request attempt #(\d+)(?:/\d+)? failed; (will retry|escalating|TCP closed|SSL closed)")
# A LogRecord's `name` is its logger's: an object's name travels as `object_name` and is written as `name`.
_RENAMED = {"object_name": "name"}
_LOGFMT_BARE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The line's fields in order: time, level, logger, msg, then the record's own (extra=) fields."""
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    ref = getattr(record, _KOPF_REF, None)
    if isinstance(ref, Mapping) and ref.get("name"):
        namespace, name = ref.get("namespace"), ref["name"]
        fields.update(kind=ref.get("kind"), namespace=namespace, name=name)
        fields["object"] = f"{namespace}/{name}" if namespace else name
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in _KOPF_FIELDS and not key.startswith("_"):
            fields[_RENAMED.get(key, key)] = value
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return {k: v for k, v in fields.items() if v is not None}


def logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if text and _LOGFMT_BARE.match(text) else json.dumps(text)


class StructuredFormatter(logging.Formatter):
    """One line per record: JSON, or key=value (logfmt). A traceback stays in the line (JSON field `stack`);
    in text it follows the line, for a human at a terminal."""

    def __init__(self, fmt: LogFormat) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        stack = self.formatException(record.exc_info) if record.exc_info else None
        if self.fmt == "json":
            if stack:
                fields["stack"] = stack
            return json.dumps(fields, default=str, ensure_ascii=False)
        line = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())
        return f"{line}\n{stack}" if stack else line


class KopfRetryFilter(logging.Filter):
    """kopf logs every failed attempt of a request it retries (8 by default, per watch stream): keep the first
    failure and the escalation, as one line with `retry`/`transient` fields; later attempts go to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _KOPF_RETRY.match(record.getMessage())
        if match is None:
            return True
        attempt, retrying = int(match.group(1)), match.group(2) == "will retry"
        record.retry, record.transient = attempt, True
        if attempt == 1 or not retrying:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def choose_format(requested: str | None) -> LogFormat:
    """--log-format wins; otherwise logfmt for a person at a terminal, JSON for a log pipeline."""
    if requested in ("json", "text"):
        return requested  # type: ignore[return-value]
    return "text" if sys.stderr.isatty() else "json"


def configure(fmt: str | None = None, *, verbose: bool = False) -> LogFormat:
    """Install the formatter on the root logger and set the levels of the libraries we sit on."""
    chosen = choose_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(chosen))
    handler.addFilter(KopfRetryFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet = {
        # Per-object lines: "Handler 'register.<locals>.child_event' succeeded." for every watch event.
        "kopf.objects": logging.WARNING,
        # "Activity 'register.<locals>.startup' succeeded." and the like.
        "kopf.activities": logging.WARNING,
        # kopf's activity chatter ("Initial authentication has finished." etc.) is kept; its watcher
        # debug lines are not.
        "kopf._core.reactor.queueing": logging.INFO,
        # urllib3 logs each of its own connection retries; the operator logs the failed call once.
        "urllib3.connectionpool": logging.ERROR,
        "aiohttp.access": logging.WARNING,
    }
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(logging.DEBUG if verbose and not name.startswith("kopf.") else level)
    return chosen


class ObjectLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose every line names one object (`namespace`, `name`, `object`); `extra=` adds fields."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def for_object(logger: logging.Logger, namespace: str, name: str, kind: str = "InferenceModel") -> ObjectLogger:
    fields = {"namespace": namespace, "object_name": name, "object": f"{namespace}/{name}", "kind": kind}
    return ObjectLogger(logger, fields)
