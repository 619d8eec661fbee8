"""libpq connection strings, read as libpq reads them, and never shown with their secrets.

``--client-dsn`` and ``--dsn`` take what the application really uses:
keyword/value or URI form. `parse_conninfo` follows libpq's conninfo_parse()
and conninfo_uri_parse_options() (src/interfaces/libpq/fe-connect.c), so a
DSN means here what it means to the client; `redact_dsn` gives a copy that
can be printed. `SECRET_KEYWORDS` is the one list of keywords whose values
are never printed, in kaobs's messages, reprs and results.

Pure: no I/O, standard library only.
"""
from __future__ import annotations

import difflib
import re

from analysis.kernel_defaults import C_SPACE
from analysis.settings import INT_MAX, INT_MIN, LIBPQ_KEYWORDS, ExpectationError

REDACTED = "***"

# Keywords libpq 18 knows (PQconndefaults), plus the legacy "requiressl" it maps.
_KNOWN_KEYWORDS = frozenset("""
    application_name channel_binding client_encoding connect_timeout dbname
    fallback_application_name gssdelegation gssencmode gsslib host hostaddr
    keepalives keepalives_count keepalives_idle keepalives_interval krbsrvname
    load_balance_hosts max_protocol_version min_protocol_version oauth_client_id
    oauth_client_secret oauth_issuer oauth_scope options passfile password port
    replication require_auth requirepeer scram_client_key scram_server_key
    service ssl_max_protocol_version ssl_min_protocol_version sslcert sslcertmode
    sslcompression sslcrl sslcrldir sslkey sslkeylogfile sslmode sslnegotiation
    sslpassword sslrootcert sslsni target_session_attrs tcp_user_timeout user
    requiressl
""".split())
# Values never shown: replaced by *** in parse_conninfo()'s result and in redact_dsn().
SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"})
_URI_PREFIXES = ("postgresql://", "postgres://")
_OTHER_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class _Malformed(Exception):
    """Internal: where and why a DSN does not parse; `safe_from` is where redaction must start hiding."""

    def __init__(self, reason: str, safe_from: int):
        super().__init__(reason)
        self.reason = reason
        self.safe_from = safe_from


def _word(keyword: str) -> str:
    """A keyword as it may appear in a message: only if libpq knows it (else it may be a fragment of a secret)."""
    return keyword if keyword in _KNOWN_KEYWORDS else "a word that is not a libpq keyword"


def _scan_keyword_value(dsn: str):
    """libpq's conninfo_parse(): yield (keyword, value, value_start, value_end) with raw spans.

    Rules (src/interfaces/libpq/fe-connect.c): whitespace separates pairs and
    may surround ``=``; an unquoted value ends at whitespace; a value in
    single quotes may contain whitespace; in both, a backslash makes the next
    character literal (``\\'`` and ``\\\\``).  Raises _Malformed.
    """
    i, n = 0, len(dsn)
    while i < n:
        if dsn[i] in C_SPACE:
            i += 1
            continue
        start = i
        while i < n and dsn[i] != "=" and dsn[i] not in C_SPACE:
            i += 1
        keyword = dsn[start:i]
        while i < n and dsn[i] in C_SPACE:
            i += 1
        if i >= n or dsn[i] != "=":
            raise _Malformed(
                f"missing \"=\" after {_word(keyword)} at character {start + 1} "
                "(a value with spaces must be in single quotes)", start)
        if not keyword:
            raise _Malformed(f"empty keyword before \"=\" at character {i + 1}", start)
        i += 1
        while i < n and dsn[i] in C_SPACE:
            i += 1
        value_start = i
        chars: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise _Malformed(
                        f"unterminated quoted string in the value of {_word(keyword)} "
                        f"(the quote opens at character {value_start + 1})", value_start)
                char = dsn[i]
                if char == "\\":
                    i += 1
                    if i < n:
                        chars.append(dsn[i])
                        i += 1
                    continue
                if char == "'":
                    i += 1
                    break
                chars.append(char)
                i += 1
            value_end = i
        else:
            while i < n and dsn[i] not in C_SPACE:
                if dsn[i] == "\\":
                    i += 1
                    if i < n:
                        chars.append(dsn[i])
                        i += 1
                else:
                    chars.append(dsn[i])
                    i += 1
            value_end = i
        yield keyword, "".join(chars), value_start, value_end


def _pct_decode(text: str, what: str, at: int) -> str:
    """libpq's conninfo_uri_decode(): %XX only ('+' stays '+'); %00 and bad escapes are errors."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        pair = text[i + 1:i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise _Malformed(f"invalid percent-encoding in {what} (near character {at + i + 1})", at)
        byte = int(pair, 16)
        if byte == 0:
            raise _Malformed(f"forbidden %00 in {what}", at)
        out.append(byte)
        i += 3
    return out.decode("utf-8", "surrogateescape")


def _uri_prefix(dsn: str) -> str | None:
    for prefix in _URI_PREFIXES:
        if dsn.startswith(prefix):
            return prefix
    return None


def _scan_uri(dsn: str) -> list[tuple[str, str]]:
    """libpq's conninfo_uri_parse_options(): (keyword, decoded value) pairs in order.

    ``postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?k=v&...]``;
    ``[...]`` brackets an IPv6 host; hosts and ports are joined with commas as
    libpq does (``h1:5432,h2`` gives host ``h1,h2`` and port ``5432,``);
    query parameters come last and override.  Raises _Malformed.
    """
    prefix = _uri_prefix(dsn)
    assert prefix is not None
    n = len(dsn)
    start = p = len(prefix)
    pairs: list[tuple[str, str]] = []
    while p < n and dsn[p] not in "@/":
        p += 1
    if p < n and dsn[p] == "@":
        q = start
        while dsn[q] not in ":@":
            q += 1
        user = dsn[start:q]
        if user:
            pairs.append(("user", _pct_decode(user, "the user name", start)))
        if dsn[q] == ":":
            r = q + 1
            while dsn[r] != "@":
                r += 1
            password = dsn[q + 1:r]
            if password:
                pairs.append(("password", _pct_decode(password, "the password", q + 1)))
            q = r
        p = q + 1
    else:
        p = start
    hosts: list[str] = []
    ports: list[str] = []
    host_start = p
    while True:
        if p < n and dsn[p] == "[":
            p += 1
            begin = p
            while p < n and dsn[p] != "]":
                p += 1
            if p >= n:
                raise _Malformed(f"no \"]\" closes the IPv6 host address opened at character {begin}", n)
            if p == begin:
                raise _Malformed(f"empty IPv6 host address at character {begin}", n)
            hosts.append(dsn[begin:p])
            p += 1
            if p < n and dsn[p] not in ":/?,":
                raise _Malformed(f"unexpected character at position {p + 1} in the URI (expected \":\" or \"/\")", n)
        else:
            begin = p
            while p < n and dsn[p] not in ":/?,":
                p += 1
            hosts.append(dsn[begin:p])
        terminator = dsn[p] if p < n else ""
        if terminator == ":":
            p += 1
            begin = p
            while p < n and dsn[p] not in "/?,":
                p += 1
            ports.append(dsn[begin:p])
            terminator = dsn[p] if p < n else ""
        if terminator != ",":
            break
        p += 1
        hosts.append(",")
        ports.append(",")
    host_text, port_text = "".join(hosts), "".join(ports)
    if host_text:
        pairs.append(("host", _pct_decode(host_text, "the host list", host_start)))
    if port_text:
        pairs.append(("port", _pct_decode(port_text, "the port list", host_start)))
    if terminator and terminator != "?":
        p += 1
        begin = p
        while p < n and dsn[p] != "?":
            p += 1
        dbname = dsn[begin:p]
        if dbname:
            pairs.append(("dbname", _pct_decode(dbname, "the database name", begin)))
        terminator = dsn[p] if p < n else ""
    if terminator:
        p += 1
        while p < n:
            begin = p
            equals = -1
            while True:
                char = dsn[p] if p < n else ""
                if char == "=":
                    if equals >= 0:
                        keyword = _lenient_decode(dsn[begin:equals])
                        raise _Malformed(f"extra \"=\" in the URI query parameter {_word(keyword)} "
                                         f"at character {p + 1} (encode it as %3D)", begin)
                    equals = p
                    p += 1
                elif char in ("&", ""):
                    end = p
                    if char:
                        p += 1
                    if equals < 0:
                        raise _Malformed(f"missing \"=\" in the URI query parameter at character {begin + 1}", begin)
                    break
                else:
                    p += 1
            keyword = _pct_decode(dsn[begin:equals], "a query parameter name", begin)
            value = _pct_decode(dsn[equals + 1:end], f"the value of the query parameter {_word(keyword)}", begin)
            if keyword == "ssl" and value == "true":  # libpq's JDBC compatibility
                keyword, value = "sslmode", "require"
            pairs.append((keyword, value))
    return pairs


def _lenient_decode(text: str) -> str:
    try:
        return _pct_decode(text, "", 0)
    except _Malformed:
        return text


def _check_unknown_keyword(keyword: str) -> None:
    """Ignore keywords libpq may know; refuse a near-miss of a keepalive keyword (libpq would refuse it too)."""
    if keyword in _KNOWN_KEYWORDS:
        return
    lowered = keyword.lower()
    if lowered.startswith("tcp_keepalives_"):
        client = lowered.removeprefix("tcp_")
        raise ExpectationError(
            f"--client-dsn: unknown keyword {keyword!r}: that is the server GUC; the libpq parameter is {client} "
            f"(to set the server's for this session: options='-c {lowered}=N')"
        )
    close = difflib.get_close_matches(lowered, LIBPQ_KEYWORDS, n=1, cutoff=0.8)
    if close:
        raise ExpectationError(f"--client-dsn: unknown keyword {keyword!r}: did you mean {close[0]}? "
                               "(libpq keywords are lower case and libpq would refuse this one)")


def _parse_conninfo_pairs(dsn: str) -> list[tuple[str, str]]:
    if _uri_prefix(dsn) is not None:
        pairs = _scan_uri(dsn)
    else:
        scheme = _OTHER_SCHEME_RE.match(dsn.lstrip(C_SPACE))
        if scheme and _uri_prefix(dsn.lstrip(C_SPACE)):
            raise _Malformed("a URI must start at the first character (libpq does not skip leading spaces)", 0)
        if scheme:
            raise _Malformed(
                f"a URI must start with postgresql:// or postgres:// (lower case), not {scheme.group(0)!r}", 0)
        pairs = [(keyword, value) for keyword, value, _, _ in _scan_keyword_value(dsn)]
    return pairs


def parse_conninfo(dsn: str) -> dict[str, str]:
    """Parse a libpq connection string as libpq does; return {keyword: value}.

    Both forms of PQconnectdb() are accepted:

    * keyword/value: ``host=db keepalives_idle = 30 password='a b\\'c'``;
      whitespace around ``=`` is allowed, an unquoted value ends at
      whitespace, single quotes allow whitespace, a backslash escapes the next
      character (quoted or not).  A later keyword overrides an earlier one.
    * URI: ``postgresql://`` or ``postgres://`` (lower case, as libpq wants),
      ``user:password@``, hosts ``h1:5432,h2`` (joined as libpq joins them:
      host ``h1,h2``, port ``5432,``), ``[::1]`` for IPv6, ``/dbname``, and
      ``?keyword=value&...`` which override the parts before; every part is
      percent-decoded (``+`` is not a space); ``ssl=true`` becomes
      ``sslmode=require``.

    Keywords libpq knows are returned whatever they are; unknown keywords are
    ignored silently (the DSN may come from a newer libpq) except a near-miss
    of a keepalive keyword (``keepalive_idle``, ``KEEPALIVES=0``,
    ``tcp_keepalives_idle``), which is an error with a suggestion because
    libpq would refuse it and the setting the user meant would be lost.

    Secrets (password, sslpassword, oauth_client_secret, scram_*_key) come
    back as ``***`` so that the result can be logged.  A malformed DSN
    (missing ``=``, unterminated quote, bad percent-escape, unclosed ``[``)
    raises ExpectationError with a position but no part of any value.
    Not done: ``service=`` lookups in pg_service.conf, environment
    variables, and the expansion of a connection string given as ``dbname``.
    """
    try:
        pairs = _parse_conninfo_pairs(dsn)
    except _Malformed as error:
        raise ExpectationError(f"--client-dsn: malformed connection string: {error.reason}") from None
    result: dict[str, str] = {}
    for keyword, value in pairs:
        _check_unknown_keyword(keyword)
        result[keyword] = REDACTED if keyword in SECRET_KEYWORDS else value
    return result


def redact_dsn(dsn: str) -> str:
    """The DSN with the value of every secret keyword replaced by ``***``.

    Keyword/value form: ``password='a b'`` becomes ``password=***`` (the
    rest is kept byte for byte; a ``dbname`` holding a connection string or
    URI is redacted inside too).  URI form: the password in the userinfo
    (``user:***@host``) and ``password=***`` query parameters.  Secrets are
    password, sslpassword, oauth_client_secret, scram_client_key and
    scram_server_key.  Never raises: when the DSN is malformed, everything
    from the point where it stops parsing is replaced by ``***`` (it may hold
    a piece of a password), and a URI is redacted on a best-effort reading
    that hides rather than shows.
    """
    if _OTHER_SCHEME_RE.match(dsn.lstrip(C_SPACE)):
        return _redact_uri(dsn)
    spans: list[tuple[int, int, str]] = []
    cut = None
    try:
        for keyword, value, value_start, value_end in _scan_keyword_value(dsn):
            if keyword in SECRET_KEYWORDS:
                spans.append((value_start, value_end, REDACTED))
            elif keyword == "dbname" and ("=" in value or _OTHER_SCHEME_RE.match(value)):
                redacted = redact_dsn(value)
                if redacted != value:
                    quoted = redacted.replace("\\", "\\\\").replace("'", "\\'")
                    spans.append((value_start, value_end, f"'{quoted}'"))
    except _Malformed as error:
        cut = error.safe_from
    out = dsn if cut is None else dsn[:cut] + REDACTED
    for begin, end, text in sorted(spans, reverse=True):
        out = out[:begin] + text + out[end:]
    return out


def _redact_uri(dsn: str) -> str:
    scheme = _OTHER_SCHEME_RE.match(dsn.lstrip(C_SPACE))
    assert scheme is not None
    start = len(dsn) - len(dsn.lstrip(C_SPACE)) + scheme.end()
    spans: list[tuple[int, int]] = []
    # userinfo: libpq looks for '@' before the first '/'; take the *last* such
    # '@' so that an unencoded '@' inside the password is hidden too.
    slash = dsn.find("/", start)
    authority_end = len(dsn) if slash < 0 else slash
    at = dsn.rfind("@", start, authority_end)
    rest_start = start
    if at >= 0:
        colon = dsn.find(":", start, at)
        if colon >= 0 and colon + 1 < at:
            spans.append((colon + 1, at))
        rest_start = at + 1
    # query parameters: a secret's value runs to the next '&' (libpq's rule);
    # a parameter may start after any '?' or '&' (hides more, never less).
    for match in re.finditer(r"[?&]", dsn[rest_start:]):
        begin = rest_start + match.end()
        param = re.match(r"([^=&?]*)=([^&]*)", dsn[begin:])
        if param and _lenient_decode(param.group(1)) in SECRET_KEYWORDS and param.group(2):
            spans.append((begin + param.start(2), begin + param.end(2)))
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    out = dsn
    for begin, end in reversed(merged):
        out = out[:begin] + REDACTED + out[end:]
    return out



def display_dsn(dsn: str) -> str:
    """A DSN as kaobs prints it: rebuilt from what was parsed, never the text as given.

    Keyword/value form out, whatever came in: ``host=db user=monitor
    password=***``. Secrets are ``***``; so is the value of a keyword libpq
    does not know (``PASSWORD=``, ``pasword=``: the user meant a password),
    whose name is shown only when it is close to a libpq keyword (else it may
    be a piece of a password with a space in it: ``?=***``). Where the DSN
    stops parsing, ``***`` stands for the rest. A URI whose ``@`` libpq would
    not read as the end of user:password (an unencoded ``@`` or ``/`` in the
    password) shows nothing of what follows the scheme, since libpq's own
    reading of it would put a piece of the password in the host or port.
    """
    prefix = _uri_prefix(dsn)
    truncated = False
    pairs: list[tuple[str, str]] = []
    if prefix is not None:
        if uri_userinfo_ambiguous(dsn):
            return prefix + REDACTED
        try:
            pairs = _scan_uri(dsn)
        except _Malformed:
            return prefix + REDACTED
    elif _OTHER_SCHEME_RE.match(dsn.lstrip(C_SPACE)):
        return REDACTED
    else:
        try:
            for keyword, value, _, _ in _scan_keyword_value(dsn):
                pairs.append((keyword, value))
        except _Malformed:
            truncated = True
    shown = [_shown_pair(keyword, value) for keyword, value in pairs]
    if truncated:
        shown.append(REDACTED)
    return " ".join(shown)


def _shown_pair(keyword: str, value: str) -> str:
    if keyword in SECRET_KEYWORDS:
        return f"{keyword}={REDACTED}"
    if keyword not in _KNOWN_KEYWORDS:
        return f"{keyword if near_keyword(keyword) else '?'}={REDACTED}"
    if keyword == "dbname" and ("=" in value or _OTHER_SCHEME_RE.match(value)):
        value = display_dsn(value)  # libpq expands a connection string given as dbname
    return f"{keyword}={_quoted(value)}"


def _quoted(value: str) -> str:
    if value and not any(c in C_SPACE or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def near_keyword(keyword: str) -> str | None:
    """The libpq keyword `keyword` misspells (``PASSWORD``, ``pasword``, ``hots``), or None."""
    lowered = keyword.lower()
    if lowered in _KNOWN_KEYWORDS:
        return lowered
    close = difflib.get_close_matches(lowered, sorted(_KNOWN_KEYWORDS), n=1, cutoff=0.8)
    return close[0] if close else None


def unknown_keyword_problem(dsn: str) -> str | None:
    """Why libpq will refuse this DSN for a keyword it does not know, without any value; None if none."""
    try:
        pairs = _parse_conninfo_pairs(dsn)
    except _Malformed:
        return None
    for keyword, _ in pairs:
        if keyword in _KNOWN_KEYWORDS:
            continue
        near = near_keyword(keyword)
        if near is None:
            return "a keyword libpq does not know (shown as ?=***)"
        if near == keyword.lower() and near != keyword:
            return f"unknown keyword {keyword}: libpq keywords are lower case ({near})"
        return f"unknown keyword {keyword}: did you mean {near}?"
    return None


def uri_userinfo_ambiguous(dsn: str) -> bool:
    """Does a URI hold an ``@`` that libpq would not read as the end of ``user:password@``?

    libpq ends the userinfo at the first ``@`` or ``/``: a password with an
    unencoded ``/`` leaves its ``@`` behind (``user:pa/ss@host``: host
    "user", port "pa"), one with an unencoded ``@`` leaves a piece in the
    host (``user:p@ss@host``: host "ss@host"). Either way the password turns
    up in libpq's errors. An ``@`` in the query string is not counted.
    """
    prefix = _uri_prefix(dsn)
    if prefix is None:
        return False
    rest = dsn[len(prefix):]
    head = rest.split("?", 1)[0]
    first_at = head.find("@")
    if first_at < 0:
        return False
    first_slash = head.find("/")
    if 0 <= first_slash < first_at:
        return True
    authority_end = head.find("/", first_at)
    return "@" in head[first_at + 1:authority_end if authority_end >= 0 else len(head)]


_INT_PARAM_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*")


def libpq_int(keyword: str, value: str) -> int:
    """libpq's pqParseIntParam(): strtol base 10, whitespace around, must fit an int."""
    if not _INT_PARAM_RE.fullmatch(value):
        raise ExpectationError(
            f"--client-dsn: invalid integer value {value!r} for {keyword} (libpq takes only a whole number here)")
    number = int(value.strip(C_SPACE))
    if not INT_MIN <= number <= INT_MAX:
        raise ExpectationError(f"--client-dsn: {keyword}={value.strip(C_SPACE)} does not fit an int (libpq refuses it)")
    return number
