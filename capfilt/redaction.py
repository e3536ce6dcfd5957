"""Credentials never reach a file or a log: the one place they are recognised and masked.

Storage options are masked by key (``key``, ``secret``, ``token``, ``Authorization``,
connection strings, ...) at any depth. Text (URLs, error messages) is masked where a
credential can stand in it: ``user:password@`` in a URL, the query parameters of a signed
URL (``X-Amz-Signature``, ``sig``, ``token``, ...) and ``AccountKey=``-style fields of a
connection string.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# A name is secret when one of its words (split at _ . -) is one of these, or it ends in one
# (AccountKey, SharedAccessSignature): ``max_text_tokens`` is not, ``X-Amz-Signature`` is.
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                "authorization", "auth", "signature", "sig", "cookie", "session", "sas")
CONNECTION_STRINGS = ("connection_string", "conn_str")

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_PARAM = re.compile(r"(?P<name>[A-Za-z][\w.-]*)=(?P<value>[^&;\s'\"]+)")


def _secret_name(name: str) -> bool:
    name = name.lower()
    words = re.split(r"[_.\-]", name)
    return (any(w in SECRET_WORDS for w in words) or name.endswith(("key", "secret", "signature", "password"))
            or any(c in name for c in CONNECTION_STRINGS))


def redact_text(text: str) -> str:
    """``text`` with the credentials in its URLs and connection strings masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _PARAM.sub(lambda m: f"{m['name']}={MASK}" if _secret_name(m["name"]) else m[0], text)


def redact_options(options: Any) -> Any:
    """Storage options with every credential masked, at any depth (``client_kwargs``,
    ``headers``): the values of secret-named keys, and the credentials in every string."""
    if isinstance(options, dict):
        return {k: MASK if _secret_name(str(k)) and not isinstance(v, (dict, list)) else redact_options(v)
                for k, v in options.items()}
    return redact_strings(options)


def redact_strings(value: Any) -> Any:
    """``value`` (a config as a dict, a list, a string) with the credentials in every string masked."""
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_options(v) if isinstance(v, dict) else redact_strings(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
