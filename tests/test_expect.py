"""Tests for analysis.expect: --expect, --client-dsn, --sysctl -> per-side expectations."""
from __future__ import annotations

import dataclasses

import pytest

from analysis.conninfo import parse_conninfo, redact_dsn
from analysis.expect import Expectations, Setting, SideExpectation, build_expectations
from analysis.gucvalue import parse_expect, parse_guc_value
from analysis.kernel_defaults import KernelDefaults, parse_sysctls
from analysis.settings import ExpectationError

SECRET = "S3cr3tPw"


def error_of(function, *args) -> str:
    with pytest.raises(ExpectationError) as info:
        function(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- --expect: names --------------------------------------------------------------------------


def test_expect_names_case_insensitive_spaces_and_quotes():
    assert parse_expect([
        "tcp_keepalives_idle=60",
        "TCP_KEEPALIVES_INTERVAL = '5s'",
        'tcp_keepalives_count="3"',
        "tcp_user_timeout=4s",
    ]) == {
        "tcp_keepalives_idle": "60",
        "tcp_keepalives_interval": "5s",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "4s",
    }


def test_expect_empty():
    assert parse_expect([]) == {}


@pytest.mark.parametrize("typo, suggestion", [
    ("tcp_keepalive_idle", "did you mean tcp_keepalives_idle?"),
    ("tcp_keepalives_intervall", "did you mean tcp_keepalives_interval?"),
    ("tcp_keepalive_count", "did you mean tcp_keepalives_count?"),
    ("tcp_usertimeout", "did you mean tcp_user_timeout?"),
])
def test_expect_typo_suggests_closest_and_lists_valid(typo, suggestion):
    message = error_of(parse_expect, [f"{typo}=5"])
    assert suggestion in message
    for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"):
        assert name in message


def test_expect_unrelated_name_lists_valid_without_suggestion():
    message = error_of(parse_expect, ["work_mem=4MB"])
    assert "did you mean" not in message
    assert "valid: tcp_keepalives_idle" in message


def test_expect_libpq_name_points_to_client_dsn():
    message = error_of(parse_expect, ["keepalives_idle=30"])
    assert "--client-dsn" in message and "tcp_keepalives_idle" in message


@pytest.mark.parametrize("name", ["net.ipv4.tcp_keepalive_time", "tcp_keepalive_probes", "net/ipv4/tcp_keepalive_intvl"])
def test_expect_sysctl_name_points_to_sysctl(name):
    assert "--sysctl" in error_of(parse_expect, [f"{name}=5"])


@pytest.mark.parametrize("item", ["tcp_keepalives_idle", "=5", "  "])
def test_expect_needs_name_equals_value(item):
    assert "NAME=VALUE" in error_of(parse_expect, [item])


def test_expect_duplicate_same_value_ok_conflict_error():
    assert parse_expect(["tcp_keepalives_idle=60", "tcp_keepalives_idle=1min"]) == {"tcp_keepalives_idle": "60"}
    assert "given twice" in error_of(parse_expect, ["tcp_keepalives_idle=60", "tcp_keepalives_idle=61"])


# -- --expect: values and units, as Postgres' parse_int() --------------------------------------


@pytest.mark.parametrize("name, value, expected", [
    ("tcp_keepalives_idle", "60", 60),
    ("tcp_keepalives_idle", "1min", 60),
    ("tcp_keepalives_idle", "1 min", 60),
    ("tcp_keepalives_idle", " 1min ", 60),
    ("tcp_keepalives_idle", "'1min'", 60),
    ('tcp_keepalives_idle', '"1min"', 60),
    ("tcp_keepalives_idle", "1.5min", 90),
    ("tcp_keepalives_idle", "0.1min", 6),
    ("tcp_keepalives_idle", "2000ms", 2),
    ("tcp_keepalives_idle", "3000000us", 3),
    ("tcp_keepalives_idle", "9h", 32400),
    ("tcp_keepalives_idle", "0x1E", 30),  # strtol base 0, as Postgres
    ("tcp_keepalives_idle", "+30s", 30),
    ("tcp_keepalives_idle", "0", 0),
    ("tcp_keepalives_idle", "0s", 0),
    ("tcp_keepalives_idle", "007", 7),  # octal and decimal agree
    ("tcp_keepalives_idle", "32767", 32767),
    ("tcp_keepalives_interval", "2s", 2),
    ("tcp_keepalives_count", "3", 3),
    ("tcp_keepalives_count", "3.0", 3),
    ("tcp_keepalives_count", "127", 127),
    ("tcp_user_timeout", "4000", 4000),
    ("tcp_user_timeout", "4s", 4000),
    ("tcp_user_timeout", "1e3", 1000),
    ("tcp_user_timeout", "1.5s", 1500),
    ("tcp_user_timeout", "1min", 60000),
    ("tcp_user_timeout", "1d", 86400000),
    ("tcp_user_timeout", "2147483647", 2147483647),
    ("tcp_user_timeout", "1000us", 1),
])
def test_guc_values_in_base_unit(name, value, expected):
    assert parse_guc_value(name, value) == expected


@pytest.mark.parametrize("item, fragment", [
    # Postgres would round these silently; we refuse and say to what
    ("tcp_keepalives_idle=1500ms", "round it to 2 s"),
    ("tcp_keepalives_idle=2500ms", "round it to 2 s"),  # rint: half to even
    ("tcp_keepalives_idle=2.5", "round it to 2 s"),
    ("tcp_keepalives_idle=0.01h", "as 60 s, not 36 s"),  # h rounded to whole minutes first
    ("tcp_user_timeout=1.5ms", "round it to 2 ms"),
    ("tcp_keepalives_count=3.5", "round it to 4"),
    ("tcp_keepalives_idle=010", "octal (8)"),
    # ranges (Postgres + Linux)
    ("tcp_keepalives_idle=32768", "out of range"),
    ("tcp_keepalives_idle=10h", "is 36000 s: out of range"),
    ("tcp_keepalives_idle=1d", "out of range"),
    ("tcp_keepalives_idle=-1", "out of range"),
    ("tcp_keepalives_interval=40000", "out of range"),
    ("tcp_keepalives_count=128", "out of range"),
    ("tcp_keepalives_count=-1", "out of range"),
    ("tcp_user_timeout=2147483648", "out of range"),
    ("tcp_user_timeout=25d", "out of range"),
    ("tcp_keepalives_idle=99999999999999999999999", "out of range"),
    # syntax
    ("tcp_keepalives_count=3s", "takes no unit"),
    ("tcp_keepalives_idle=1MIN", "invalid unit"),  # units are case-sensitive
    ("tcp_keepalives_idle=1minutes", "invalid unit"),
    ("tcp_keepalives_idle=1 min x", "invalid unit"),
    ("tcp_keepalives_idle=5sec", "invalid unit"),
    ("tcp_keepalives_idle=08", "invalid unit"),  # strtol stops at 8, as in Postgres
    ("tcp_keepalives_idle=abc", "not a number"),
    ("tcp_keepalives_idle=", "empty value"),
    ("tcp_keepalives_idle=''", "empty value"),
    ("tcp_keepalives_idle=inf", "not a number"),
    ("tcp_keepalives_idle=nan", "not a number"),
])
def test_guc_value_errors(item, fragment):
    message = error_of(parse_expect, [item])
    assert fragment in message
    assert message.startswith("--expect ")


def test_parse_guc_value_unknown_name():
    assert "did you mean tcp_keepalives_idle" in error_of(parse_guc_value, "tcp_keepalive_idle", "5")


# -- --sysctl ---------------------------------------------------------------------------------


def test_sysctl_defaults_when_none_given():
    server, client = parse_sysctls([])
    assert server == client == KernelDefaults()
    assert (server.keepalive_time, server.keepalive_intvl, server.keepalive_probes) == (7200, 75, 9)
    assert server.source == "built-in Linux defaults"


@pytest.mark.parametrize("item", [
    "net.ipv4.tcp_keepalive_time=600",
    "net/ipv4/tcp_keepalive_time=600",
    "/proc/sys/net/ipv4/tcp_keepalive_time=600",
    "tcp_keepalive_time=600",
    "net.ipv4.tcp_keepalive_time = 600",
    "NET.IPV4.TCP_KEEPALIVE_TIME=600",
])
def test_sysctl_forms_apply_to_both_sides(item):
    server, client = parse_sysctls([item])
    assert server.keepalive_time == client.keepalive_time == 600
    assert server.keepalive_intvl == 75 and server.keepalive_probes == 9
    assert server.origin("keepalive_time") == item.strip()
    assert "built-in Linux defaults for the rest" in server.source


def test_sysctl_per_side_prefix_wins_over_unprefixed_in_any_order():
    for items in (
        ["server:net.ipv4.tcp_keepalive_time=60", "net.ipv4.tcp_keepalive_time=600"],
        ["net.ipv4.tcp_keepalive_time=600", "server:net.ipv4.tcp_keepalive_time=60"],
    ):
        server, client = parse_sysctls(items)
        assert server.keepalive_time == 60
        assert client.keepalive_time == 600
        assert server.describe("keepalive_time") == "kernel default 60 s (--sysctl server:net.ipv4.tcp_keepalive_time=60)"


def test_sysctl_client_only():
    server, client = parse_sysctls(["client:net/ipv4/tcp_keepalive_intvl=10", "client:tcp_keepalive_probes=3"])
    assert server == KernelDefaults()
    assert (client.keepalive_time, client.keepalive_intvl, client.keepalive_probes) == (7200, 10, 3)
    assert client.describe("keepalive_probes") == "kernel default 3 probes (--sysctl client:tcp_keepalive_probes=3)"
    assert client.describe("keepalive_time") == "kernel default 7200 s (net.ipv4.tcp_keepalive_time, built-in Linux default)"


@pytest.mark.parametrize("item, fragment", [
    ("net.ipv4.tcp_keepalive_interval=5", "did you mean net.ipv4.tcp_keepalive_intvl?"),
    ("net.ipv6.tcp_keepalive_time=5", "did you mean net.ipv4.tcp_keepalive_time?"),
    ("net.ipv4.tcp_fin_timeout=5", "unknown sysctl"),
    ("pod:net.ipv4.tcp_keepalive_time=5", "unknown side"),
    ("net.ipv4.tcp_keepalive_time", "expected"),
    ("net.ipv4.tcp_keepalive_time=1min", "whole number"),
    ("net.ipv4.tcp_keepalive_time=-5", "whole number"),
    ("net.ipv4.tcp_keepalive_time=0", "out of range"),
    ("net.ipv4.tcp_keepalive_intvl=0", "out of range"),
    ("net.ipv4.tcp_keepalive_probes=256", "out of range"),
])
def test_sysctl_errors(item, fragment):
    message = error_of(parse_sysctls, [item])
    assert fragment in message and message.startswith("--sysctl ")


def test_sysctl_conflict_same_side_is_error_but_repeat_is_fine():
    assert "given twice" in error_of(parse_sysctls, ["tcp_keepalive_time=5", "net.ipv4.tcp_keepalive_time=6"])
    assert "given twice" in error_of(parse_sysctls, ["client:tcp_keepalive_time=5", "client:tcp_keepalive_time=6"])
    server, client = parse_sysctls(["tcp_keepalive_time=5", "net.ipv4.tcp_keepalive_time=5"])
    assert server.keepalive_time == 5
    # different sides never conflict
    server, client = parse_sysctls(["server:tcp_keepalive_time=5", "client:tcp_keepalive_time=6"])
    assert (server.keepalive_time, client.keepalive_time) == (5, 6)


def test_sysctl_probes_zero_is_allowed_by_the_kernel():
    server, _ = parse_sysctls(["net.ipv4.tcp_keepalive_probes=0"])
    assert server.keepalive_probes == 0


# -- conninfo: keyword/value ------------------------------------------------------------------


def test_conninfo_keyword_value_basics():
    assert parse_conninfo("host=db port=5432 keepalives_idle=30") == {"host": "db", "port": "5432", "keepalives_idle": "30"}


def test_conninfo_spaces_around_equals_and_between_pairs():
    assert parse_conninfo("  host = db\tkeepalives_idle=  30\n  keepalives =0 ") == {
        "host": "db", "keepalives_idle": "30", "keepalives": "0"}


def test_conninfo_quoting_and_escapes():
    dsn = r"host=db application_name='a b\'c\\d' options='-c tcp_keepalives_idle=2' user=x\ y sslmode=''"
    assert parse_conninfo(dsn) == {
        "host": "db",
        "application_name": "a b'c\\d",
        "options": "-c tcp_keepalives_idle=2",
        "user": "x y",
        "sslmode": "",
    }


def test_conninfo_quoted_values_need_no_separator_and_later_wins():
    assert parse_conninfo("host='a'port='5'host=b") == {"host": "b", "port": "5"}


def test_conninfo_empty_and_blank():
    assert parse_conninfo("") == {}
    assert parse_conninfo("   ") == {}


def test_conninfo_password_never_returned():
    assert parse_conninfo(f"host=db password='{SECRET}' sslpassword={SECRET}") == {
        "host": "db", "password": "***", "sslpassword": "***"}


def test_conninfo_unknown_keywords_are_ignored_not_fatal():
    assert parse_conninfo("host=db some_future_option=1 x=y") == {"host": "db", "some_future_option": "1", "x": "y"}


@pytest.mark.parametrize("dsn, fragment", [
    ("keepalive_idle=30", "did you mean keepalives_idle?"),
    ("keepalives_intervall=5", "did you mean keepalives_interval?"),
    ("KEEPALIVES=0", "did you mean keepalives?"),
    ("keepalive=0", "did you mean keepalives?"),
    ("tcp_usertimeout=5", "did you mean tcp_user_timeout?"),
    ("tcp_keepalives_idle=30", "the libpq parameter is keepalives_idle"),
])
def test_conninfo_keepalive_typos_are_errors(dsn, fragment):
    assert fragment in error_of(parse_conninfo, f"host=db {dsn}")


@pytest.mark.parametrize("dsn, fragment", [
    ("host=db port", 'missing "=" after port'),
    ("host db", 'missing "=" after host'),
    ("host=db =5", "empty keyword"),
    ("host='db", "unterminated quoted string in the value of host"),
    ("host='db\\'", "unterminated quoted string"),
    ("host='db\\", "unterminated quoted string"),
    ("postgresql+psycopg://u@h/db", "must start with postgresql://"),
    ("POSTGRESQL://h/db", "must start with postgresql://"),
    (" postgresql://h/db", "first character"),
])
def test_conninfo_malformed(dsn, fragment):
    message = error_of(parse_conninfo, dsn)
    assert fragment in message and message.startswith("--client-dsn")


# -- conninfo: URI ----------------------------------------------------------------------------


def test_uri_full():
    assert parse_conninfo("postgresql://user:pw@host:5432/db?keepalives_idle=30&keepalives=1") == {
        "user": "user", "password": "***", "host": "host", "port": "5432", "dbname": "db",
        "keepalives_idle": "30", "keepalives": "1"}


def test_uri_postgres_scheme_and_empty():
    assert parse_conninfo("postgres://h") == {"host": "h"}
    assert parse_conninfo("postgresql://") == {}
    assert parse_conninfo("postgresql:///db") == {"dbname": "db"}
    assert parse_conninfo("postgresql://h?") == {"host": "h"}


def test_uri_percent_decoding_everywhere_and_plus_stays():
    assert parse_conninfo("postgresql://us%65r@h%6Fst/d%2Fb?application_name=a+b%20c&keepalives_idl%65=3%30") == {
        "user": "user", "host": "host", "dbname": "d/b", "application_name": "a+b c", "keepalives_idle": "30"}
    assert parse_conninfo("postgresql://h/%C3%A9t%C3%A9")["dbname"] == "été"


def test_uri_multiple_hosts_joined_as_libpq_does():
    assert parse_conninfo("postgresql://host1:5432,host2/db") == {"host": "host1,host2", "port": "5432,", "dbname": "db"}
    assert parse_conninfo("postgresql://h1:1,h2:2,h3:3") == {"host": "h1,h2,h3", "port": "1,2,3"}


def test_uri_ipv6_and_query_override():
    assert parse_conninfo("postgresql://[::1]:5433/db") == {"host": "::1", "port": "5433", "dbname": "db"}
    assert parse_conninfo("postgresql://[2001:db8::1],[::1]:7") == {"host": "2001:db8::1,::1", "port": ",7"}
    assert parse_conninfo("postgresql://h/db?host=other&port=1")["host"] == "other"


def test_uri_user_without_password_and_jdbc_ssl():
    assert parse_conninfo("postgresql://u@h") == {"user": "u", "host": "h"}
    assert parse_conninfo("postgresql://h?ssl=true") == {"host": "h", "sslmode": "require"}


def test_uri_at_sign_in_encoded_password():
    assert parse_conninfo("postgresql://u:p%40ss@h/db") == {"user": "u", "password": "***", "host": "h", "dbname": "db"}


def test_uri_unknown_query_params_ignored_but_keepalive_typos_caught():
    assert parse_conninfo("postgresql://h?whatever=1")["whatever"] == "1"
    assert "did you mean keepalives_count?" in error_of(parse_conninfo, "postgresql://h?keepalive_count=3")


@pytest.mark.parametrize("dsn, fragment", [
    ("postgresql://h/db?keepalives_idle", 'missing "="'),
    ("postgresql://h/db?a=1&&b=2", 'missing "="'),
    ("postgresql://h/db?keepalives_idle=3=4", 'extra "=" in the URI query parameter keepalives_idle'),
    ("postgresql://h/db%zz", "invalid percent-encoding in the database name"),
    ("postgresql://h/db?x=%4", "invalid percent-encoding"),
    ("postgresql://h/db%00", "forbidden %00"),
    ("postgresql://[::1/db", 'no "]"'),
    ("postgresql://[]/db", "empty IPv6"),
    ("postgresql://[::1]x/db", "unexpected character"),
])
def test_uri_malformed(dsn, fragment):
    message = error_of(parse_conninfo, dsn)
    assert fragment in message and message.startswith("--client-dsn")


LIBPQ_CROSS_CHECK = [
    "host=db port=5432 keepalives_idle=30",
    "  host = db\tkeepalives_idle=  30\n  keepalives =0 ",
    r"host=db application_name='a b\'c\\d' options='-c tcp_keepalives_idle=2' user=x\ y sslmode=''",
    "host='a'port='5'host=b",
    "",
    "postgresql://user@host:5432/db?keepalives_idle=30&keepalives=1",
    "postgres://h",
    "postgresql://",
    "postgresql:///db",
    "postgresql://us%65r@h%6Fst/d%2Fb?application_name=a+b%20c&keepalives_idl%65=3%30",
    "postgresql://host1:5432,host2/db",
    "postgresql://h1:1,h2:2,h3:3",
    "postgresql://[::1]:5433/db",
    "postgresql://[2001:db8::1],[::1]:7",
    "postgresql://h/db?host=other&port=1",
    "postgresql://h?ssl=true",
    "postgresql://h?",
]


@pytest.mark.parametrize("dsn", LIBPQ_CROSS_CHECK)
def test_conninfo_matches_libpq(dsn):
    """Our parser against libpq's own PQconninfoParse(), when libpq is at hand (no connection is made)."""
    pq = pytest.importorskip("psycopg.pq")
    try:
        options = pq.Conninfo.parse(dsn.encode())
    except Exception as error:  # pragma: no cover - libpq missing or too old
        pytest.skip(f"libpq could not parse: {error}")
    theirs = {o.keyword.decode(): o.val.decode() for o in options if o.val is not None}
    assert parse_conninfo(dsn) == theirs


@pytest.mark.parametrize("dsn", [
    "host=db port", "host='db", "postgresql://h/db?x", "postgresql://h/db?x=1=2", "postgresql://[::1/db",
    "postgresql://h/db%zz",
])
def test_conninfo_malformed_matches_libpq(dsn):
    pq = pytest.importorskip("psycopg.pq")
    with pytest.raises(Exception):
        pq.Conninfo.parse(dsn.encode())
    with pytest.raises(ExpectationError):
        parse_conninfo(dsn)


# -- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize("dsn, redacted", [
    (f"host=db password={SECRET} user=u", "host=db password=*** user=u"),
    (f"host=db password = '{SECRET} x\\'y' user=u", "host=db password = *** user=u"),
    (f"password={SECRET}", "password=***"),
    (f"host=db sslpassword={SECRET} scram_client_key={SECRET}", "host=db sslpassword=*** scram_client_key=***"),
    ("host=db user=u", "host=db user=u"),
    ("", ""),
    (f"postgresql://u:{SECRET}@h:5432/db", "postgresql://u:***@h:5432/db"),
    (f"postgres://u:{SECRET}@h/db?keepalives=1", "postgres://u:***@h/db?keepalives=1"),
    (f"postgresql://u@h/db?password={SECRET}&keepalives_idle=3", "postgresql://u@h/db?password=***&keepalives_idle=3"),
    (f"postgresql://h/db?keepalives_idle=3&password={SECRET}", "postgresql://h/db?keepalives_idle=3&password=***"),
    (f"postgresql://h/db?pass%77ord={SECRET}", "postgresql://h/db?pass%77ord=***"),
    (f"postgresql://u:{SECRET}@h/db?password={SECRET}", "postgresql://u:***@h/db?password=***"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    # an unencoded '@' in the password: hide it all
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    # a URI libpq refuses is still redacted
    (f"postgresql+psycopg://u:{SECRET}@h/db", "postgresql+psycopg://u:***@h/db"),
    (f"postgresql://h/db?x=1?password={SECRET}", "postgresql://h/db?x=1?password=***"),
    # a connection string in dbname (psql's expand_dbname)
    (f"dbname='postgresql://u:{SECRET}@h/db' keepalives=1", "dbname='postgresql://u:***@h/db' keepalives=1"),
    (f"dbname='host=h password={SECRET}'", "dbname='host=h password=***'"),
    # malformed: everything from where parsing stops is hidden
    (f"host=db password='{SECRET}", "host=db password=***"),
    (f"host=db password={SECRET} more words", "host=db password=*** ***"),
    (f"host=db application_name='x password={SECRET}", "host=db application_name=***"),
])
def test_redact_dsn(dsn, redacted):
    assert redact_dsn(dsn) == redacted


def test_redacted_dsn_still_parses_the_same():
    dsn = f"host=db password='{SECRET} a' keepalives_idle=30"
    assert parse_conninfo(redact_dsn(dsn)) == parse_conninfo(dsn)


MALFORMED_WITH_SECRET = [
    f"host=db password='{SECRET}",
    f"host=db password={SECRET} more",
    f"host=db password= {SECRET} {SECRET}",
    f"host=db password={SECRET} =x",
    f"password='{SECRET}\\",
    f"host='{SECRET}",
    f"{SECRET} host=db",
    f"{SECRET}",
    f"host=db password={SECRET} keepalives_idle=abc",
    f"host=db password={SECRET} keepalives_idle=99999",
    f"postgresql://u:{SECRET}@h/db?x",
    f"postgresql://u:{SECRET}@h/db?password={SECRET}=x",
    f"postgresql://u:{SECRET}%zz@h/db",
    f"postgresql://u:{SECRET}%00@h/db",
    f"postgresql://u:{SECRET}@[::1/db",
    f"postgresql://u:{SECRET}@[]/db",
    f"postgresql://u:{SECRET}@[::1]x/db",
    f"postgresql://h/db?password={SECRET}&&",
    f"postgresql://h/db?password=%{SECRET}",
    f"postgresql://h/db?{SECRET}=1=2",
    f"postgresql+psycopg://u:{SECRET}@h/db",
    f" postgresql://u:{SECRET}@h/db",
    f"postgresql://u:{SECRET}@h/db?keepalives=zz",
]


@pytest.mark.parametrize("dsn", MALFORMED_WITH_SECRET)
def test_errors_never_contain_the_password(dsn):
    with pytest.raises(ExpectationError) as info:
        build_expectations(client_dsn=dsn)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    for chained in (info.value.__cause__, info.value.__context__):
        assert SECRET not in repr(chained) and SECRET not in str(chained)
    if f"?{SECRET}=" not in dsn:  # there the "secret" is a keyword, which redaction keeps
        assert SECRET not in redact_dsn(dsn)


def test_expectations_repr_never_contains_the_password():
    exp = build_expectations(["tcp_keepalives_idle=5"], f"postgresql://u:{SECRET}@h/db?keepalives_idle=7&password={SECRET}")
    assert SECRET not in repr(exp)
    assert exp.client.idle.value == 7


# -- resolution: server -----------------------------------------------------------------------


def test_no_expect_no_dsn_judges_nothing():
    exp = build_expectations()
    assert isinstance(exp, Expectations)
    for side in (exp.server, exp.client):
        assert side.enabled is None
        assert not side.judged()
        assert all(s.value is None and s.given is None for s in side.settings().values())
    assert exp.server.side == "server" and exp.client.side == "client"
    assert "no --expect" in exp.server.idle.source
    assert "no --client-dsn" in exp.client.idle.source


def test_only_idle_given_judges_only_idle():
    server = build_expectations(["tcp_keepalives_idle=1min"]).server
    assert server.enabled is True and server.judged()
    assert server.idle == Setting(60, "tcp_keepalives_idle=1min", "--expect")
    assert server.interval.value is None and server.count.value is None and server.user_timeout.value is None
    assert "not judged" in server.interval.source


def test_server_all_given():
    server = build_expectations(["tcp_keepalives_idle=3", "tcp_keepalives_interval=2",
                                 "tcp_keepalives_count=3", "tcp_user_timeout=4s"]).server
    assert (server.idle.value, server.interval.value, server.count.value, server.user_timeout.value) == (3, 2, 3, 4.0)
    assert isinstance(server.count.value, int)


def test_server_user_timeout_converted_to_seconds():
    assert build_expectations(["tcp_user_timeout=1500"]).server.user_timeout.value == 1.5


def test_server_zero_resolves_to_builtin_kernel_default():
    server = build_expectations(["tcp_keepalives_idle=0", "tcp_keepalives_interval=0s", "tcp_keepalives_count=0"]).server
    assert server.idle == Setting(7200, "tcp_keepalives_idle=0",
                                  "kernel default 7200 s (net.ipv4.tcp_keepalive_time, built-in Linux default)")
    assert server.interval.value == 75 and "net.ipv4.tcp_keepalive_intvl" in server.interval.source
    assert server.count.value == 9 and "kernel default 9 probes" in server.count.source


def test_server_zero_resolves_to_the_server_namespace_sysctl():
    exp = build_expectations(
        ["tcp_keepalives_idle=0"], "keepalives_idle=0",
        ["server:net.ipv4.tcp_keepalive_time=60", "client:net.ipv4.tcp_keepalive_time=30"])
    assert exp.server.idle.value == 60
    assert exp.server.idle.source == "kernel default 60 s (--sysctl server:net.ipv4.tcp_keepalive_time=60)"
    assert exp.client.idle.value == 30
    assert "--sysctl client:net.ipv4.tcp_keepalive_time=30" in exp.client.idle.source


def test_sysctl_alone_judges_nothing():
    exp = build_expectations(sysctls=["net.ipv4.tcp_keepalive_time=60"])
    assert not exp.server.judged() and not exp.client.judged()


def test_server_user_timeout_zero_is_not_set():
    server = build_expectations(["tcp_user_timeout=0"]).server
    assert server.user_timeout.value == 0
    assert "not set" in server.user_timeout.source
    assert server.idle.value is None


def test_build_accepts_a_single_string():
    assert build_expectations("tcp_keepalives_idle=5", None, "tcp_keepalive_time=9").server.idle.value == 5


def test_build_propagates_expect_errors():
    assert "did you mean" in error_of(build_expectations, ["tcp_keepalive_idle=5"])


# -- resolution: client -----------------------------------------------------------------------


def test_client_dsn_unset_parameters_are_kernel_defaults():
    client = build_expectations(client_dsn="host=db").client
    assert client.enabled is True and client.judged()
    assert client.idle.value == 7200 and client.idle.given is None
    assert client.idle.source.startswith("libpq default")
    assert (client.interval.value, client.count.value, client.user_timeout.value) == (75, 9, 0)
    assert client.enabled_source == "libpq default keepalives=1"


def test_client_empty_dsn_is_judged_with_defaults():
    assert build_expectations(client_dsn="").client.idle.value == 7200


def test_client_dsn_values():
    client = build_expectations(
        client_dsn="postgresql://u@h/db?keepalives_idle=2&keepalives_interval=%201%20&keepalives_count=%2B3&tcp_user_timeout=4000").client
    assert client.idle == Setting(2, "keepalives_idle=2 (client DSN)", "client DSN")
    assert client.interval.value == 1  # whitespace around is fine for libpq
    assert client.count.value == 3
    assert client.user_timeout.value == 4.0
    assert client.user_timeout.given == "tcp_user_timeout=4000 (client DSN)"


def test_client_zero_and_negative_resolve_to_client_kernel_default_with_caution():
    client = build_expectations(client_dsn="keepalives_idle=0 keepalives_count=-2",
                                sysctls=["client:tcp_keepalive_probes=4"]).client
    assert client.idle.value == 7200
    assert client.idle.given == "keepalives_idle=0 (client DSN)"
    assert "kernel default 7200 s" in client.idle.source
    assert "EINVAL" in client.idle.source  # libpq hands 0 to setsockopt(), which Linux refuses
    assert client.count.value == 4 and "client:tcp_keepalive_probes=4" in client.count.source


def test_client_user_timeout_zero_or_negative_is_not_set():
    assert build_expectations(client_dsn="tcp_user_timeout=0").client.user_timeout.value == 0
    assert build_expectations(client_dsn="tcp_user_timeout=-3").client.user_timeout.value == 0


def test_client_keepalives_zero_must_not_probe():
    client = build_expectations(["tcp_keepalives_idle=5"], "host=db keepalives=0 keepalives_idle=30").client
    assert client.enabled is False
    assert client.judged()
    assert client.idle.value is None and client.interval.value is None and client.count.value is None
    assert client.idle.given == "keepalives_idle=30 (client DSN)"
    assert "keepalives=0" in client.idle.source
    assert client.user_timeout.value == 0
    assert "keepalives=0" in client.enabled_source


def test_client_keepalives_zero_ignores_the_other_parameters_like_libpq():
    client = build_expectations(client_dsn="keepalives=0 keepalives_idle=abc tcp_user_timeout=zz").client
    assert client.enabled is False
    assert "not applied" in client.user_timeout.source


@pytest.mark.parametrize("keepalives", ["1", "-1", " 2 ", "+1"])
def test_client_keepalives_nonzero_is_on(keepalives):
    assert build_expectations(client_dsn=f"keepalives='{keepalives}'").client.enabled is True


@pytest.mark.parametrize("dsn, fragment", [
    ("keepalives_idle=abc", "invalid integer value 'abc' for keepalives_idle"),
    ("keepalives_idle=1.5", "invalid integer"),
    ("keepalives_idle=0x10", "invalid integer"),
    ("keepalives_idle=30s", "invalid integer"),
    ("keepalives_idle=''", "invalid integer"),
    ("keepalives=yes", "invalid integer value 'yes' for keepalives"),
    ("keepalives_idle=2147483648", "does not fit an int"),
    ("keepalives_idle=32768", "out of range"),
    ("keepalives_interval=32768", "out of range"),
    ("keepalives_count=128", "out of range"),
    ("tcp_user_timeout=abc", "invalid integer"),
    ("tcp_user_timeout=2147483648", "does not fit an int"),
])
def test_client_value_errors(dsn, fragment):
    message = error_of(build_expectations, (), dsn)
    assert fragment in message and message.startswith("--client-dsn")


# -- the types --------------------------------------------------------------------------------


def test_types_are_frozen_slotted_dataclasses():
    for cls in (Setting, SideExpectation, KernelDefaults, Expectations):
        assert dataclasses.is_dataclass(cls)
        assert hasattr(cls, "__slots__")
    setting = Setting(1, None, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.value = 2  # type: ignore[misc]
    assert issubclass(ExpectationError, ValueError)


def test_side_expectation_judged():
    unset = Setting(None, None, "not judged")
    assert not SideExpectation("server", None, unset, unset, unset, unset).judged()
    assert SideExpectation("client", False, unset, unset, unset, unset).judged()
    assert SideExpectation("server", None, Setting(5, "x", "--expect"), unset, unset, unset).judged()
