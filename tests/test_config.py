from pathlib import Path

import pytest

from fetcher.config import build_job, default_dest, load_config
from fetcher.errors import ConfigError


def test_defaults_follow_lftp_and_the_connection_cap() -> None:
    job = build_job({"url": "https://m.example/centos/7/os/x86_64/Packages/", "procs": 4}, "x")
    assert job.dest == Path("Packages")
    assert job.max_connections == 8 and job.threads == 2
    assert default_dest("http://h/") == Path("h")


@pytest.mark.parametrize(
    ("url", "dest"),
    [
        ("http://h/pub/Packages/./", "Packages"),
        ("http://h/pub/Packages/os/../", "Packages"),
        ("http://h/pub/Packages//", "Packages"),
        ("http://h/pub/..", "h"),
        ("http://h/pub/%2e%2e/", "h"),
    ],
)
def test_default_dest_is_the_directory_dot_segments_name(url: str, dest: str) -> None:
    """``.../Packages/./`` is ``.../Packages/`` (RFC 3986 dot segments, as the crawl and any
    server resolve them): DEST was named after the host."""
    assert default_dest(url) == Path(dest)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"url": "http://h/", "threads": 0},
            "x.threads: expected an integer from 1 to 1024, got 0",
        ),
        (
            {"url": "http://h/", "threads": "eight"},
            'x.threads: expected an integer from 1 to 1024, got "eight"',
        ),
        (
            {"url": "http://h/", "procs": True},
            "x.procs: expected an integer from 1 to 1024, got True",
        ),
        ({"url": "ftp://h/"}, 'x.url: expected an http:// or https:// URL, got "ftp://h/"'),
        ({"url": "http://h/", "limit_rate": "fast"}, "x.limit_rate: expected a rate"),
        ({"url": "http://h/", "thread": 3}, "x.thread: unknown key"),
        ({"url": "http://h/", "max_delete": "200%"}, "x.max_delete"),
        ({}, "x: missing required key 'url'"),
        (
            {"url": "http://h/", "timeout": float("inf")},
            "x.timeout: expected a number from 0.001 to 86400, got inf",
        ),
        (
            {"url": "http://h/", "timeout": 1e300},
            "x.timeout: expected a number from 0.001 to 86400, got 1e+300",
        ),
        (
            {"url": "http://h/", "connect_timeout": 0},
            "x.connect_timeout: expected a number from 0.001 to 86400, got 0",
        ),
        (
            {"url": "http://h/", "listing_rate": 1e-6},
            "x.listing_rate: expected a number from 0.001 to 10000, got 1e-06",
        ),
        (
            {"url": "http://h/", "limit_rate": 0.001},
            "x.limit_rate: expected a rate like 500k, 10M or a number of bytes per second,"
            " from 1 to 1024G, got 0.001",
        ),
        ({"url": "http://h/", "limit_rate": "1e-6"}, 'from 1 to 1024G, got "1e-6"'),
        ({"url": "http://h/", "limit_rate": "2000G"}, 'from 1 to 1024G, got "2000G"'),
        ({"url": "http://h/", "listing_rate": float("nan")}, "x.listing_rate: expected a number"),
        ({"url": "http://h/", "limit_rate": "inf"}, "x.limit_rate: expected a rate"),
        ({"url": "http://h/", "limit_rate": float("inf")}, "x.limit_rate: expected a rate"),
        ({"url": "http://h/", "max_delete": float("nan")}, "x.max_delete: expected a count"),
        (
            {"url": "http://h/", "aliases": ["ftp://h2/"]},
            'x.aliases: expected HOST or HOST:PORT, such as mirror.example.org, got "ftp://h2/"',
        ),
        ({"url": "http://h/", "aliases": "h2:99999"}, "x.aliases: expected HOST or HOST:PORT"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_job(values, "x")
    assert message in str(exc.value)


def test_rates_and_percentages() -> None:
    job = build_job({"url": "http://h/", "limit_rate": "1.5M", "max_delete": "5%"}, "x")
    assert job.limit_rate == 1.5 * (1 << 20) and abs(job.max_delete - 0.05) < 1e-9
    job = build_job(
        {"url": "http://h/", "limit_rate": 1, "listing_rate": 0.001, "timeout": 86400}, "x"
    )
    assert (job.limit_rate, job.listing_rate, job.timeout) == (1.0, 0.001, 86400.0)
    assert build_job({"url": "http://h/", "limit_rate": "1024G"}, "x").limit_rate == 1 << 40


def test_load_config(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[defaults]\nprocs = 2\n[jobs.a]\nurl = "http://h/a/"\ndest = "out/a"\n[jobs.b]\nurl = "http://h/b/"\nthreads = 1\n'
    )
    jobs = load_config(cfg)
    assert list(jobs) == ["a", "b"]
    assert jobs["a"].dest == tmp_path / "out/a" and jobs["a"].procs == 2
    assert jobs["b"].dest == tmp_path / "b" and jobs["b"].threads == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[jobs.a]\nurl = 'http://h/'\nthreads = 'eight'\n",
            'm.toml: jobs.a.threads: expected an integer from 1 to 1024, got "eight"',
        ),
        ("[jobs.a\n", "m.toml: not valid TOML"),
        ("[defaults]\n", "m.toml: no [jobs.NAME] table"),
        ("[job.a]\nurl='http://h/'\n", "m.toml: job: unknown table"),
        ("[jobs.a]\ndest = 'x'\n", "m.toml: jobs.a: missing required key 'url'"),
        # a mistake in [defaults] is named there, not in the first job (which has no such key)
        (
            "[defaults]\nmax_conections = 4\n[jobs.a]\nurl='http://h/'\n",
            "m.toml: defaults.max_conections: unknown key",
        ),
        (
            "[defaults]\nthreads = 'eight'\n[jobs.a]\nurl='http://h/'\n",
            'm.toml: defaults.threads: expected an integer from 1 to 1024, got "eight"',
        ),
        # a key that means nothing without another, as its option would be on the command line
        (
            "[jobs.a]\nurl='http://h/'\nmax_delete = '5%'\n",
            "m.toml: jobs.a.max_delete: goes with delete = true",
        ),
        (
            "[jobs.a]\nurl='http://h/'\nsuites = ['stable']\n",
            'm.toml: jobs.a.suites: goes with index = "debian"',
        ),
        (
            "[jobs.a]\nurl='http://h/'\nscheduler = 'tcp://127.0.0.1:8786'\n",
            'm.toml: jobs.a.scheduler: goes with executor = "dask"',
        ),
        (  # one check off and a CA bundle for it: which was meant?
            "[jobs.a]\nurl='https://h/'\ninsecure = true\nca_cert = 'ca.pem'\n",
            "m.toml: jobs.a.insecure: turns off the check that ca_cert is for",
        ),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("mirror", "did you mean 'url'?"),  # (the README: "--mirror is url")
        ("arch", "did you mean 'architectures'?"),
        ("max-conections", "did you mean 'max_connections'?"),
        # was "did you mean 'post'?", and "did you mean 'retries'?" for metrics
        ("report", "--report is an option of the command line only"),
        ("metrics", "--metrics is an option of the command line only"),
        ("log_file", "--log-file is an option of the command line only"),
        ("quiet", "--quiet is an option of the command line only"),
    ],
)
def test_an_unknown_key_s_hint_names_what_to_write_instead(
    tmp_path: Path, key: str, hint: str
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f"[jobs.a]\nurl = 'http://h/'\n{key} = 'x'\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.message == f"m.toml: jobs.a.{key}: unknown key"
    assert exc.value.hint == hint


def test_a_dependent_key_is_checked_against_the_file_not_the_command_line(tmp_path: Path) -> None:
    """A job with ``delete = true`` and ``max_delete`` run once with ``--no-delete``: its
    max_delete still goes with the file's delete; and one from [defaults] is every job's,
    used by those that delete."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[defaults]\nmax_delete = '5%'\n"
        "[jobs.a]\nurl='http://h/a/'\ndelete = true\nmax_delete = 3\n[jobs.b]\nurl='http://h/b/'\n"
    )
    assert not load_config(cfg, overrides={"delete": False})["a"].delete
    assert load_config(cfg)["a"].delete
    import certifi  # (httpx's: a real bundle)

    cfg.write_text(f"[jobs.a]\nurl='https://h/a/'\nca_cert = '{certifi.where()}'\n")
    assert load_config(cfg, overrides={"insecure": True})["a"].insecure  # a one-off: fine


def test_paths_in_a_config_take_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dest = "$MIRRORS/centos"`` made a directory named ``$MIRRORS`` beside the file;
    a variable that is not set is a mistake to say, and ``$$`` is a ``$``."""
    monkeypatch.setenv("FETCH_TEST_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("FETCH_TEST_UNSET", raising=False)
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[defaults]\npost_dest = '${FETCH_TEST_ROOT}/derived/'\n"
        "[jobs.a]\nurl='http://h/a/'\ndest = '$FETCH_TEST_ROOT/a'\n"
        "[jobs.b]\nurl='http://h/b/'\ndest = 'pay$$day'\n"
    )
    jobs = load_config(cfg)
    assert jobs["a"].dest == tmp_path / "root" / "a"
    assert jobs["a"].post_dest == tmp_path / "root" / "derived"
    assert jobs["b"].dest == tmp_path / "pay$day"
    cfg.write_text("[jobs.a]\nurl='http://h/a/'\ndest = '$FETCH_TEST_UNSET/a'\n")
    with pytest.raises(ConfigError, match=r"m.toml: jobs.a.dest: \$FETCH_TEST_UNSET is not set"):
        load_config(cfg)


def test_aliases_are_hosts_with_or_without_a_port() -> None:
    job = build_job(
        {"url": "http://h/", "aliases": ["m2.example.org", "10.0.0.1:8080", "[::1]:81"]}, "x"
    )
    assert job.aliases == ("m2.example.org", "10.0.0.1:8080", "[::1]:81")


def test_two_jobs_of_one_config_cannot_share_a_dest(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[jobs.a]\nurl = 'http://h/a/'\ndest = 'out'\n[jobs.b]\nurl = 'http://h/b/'\ndest = './out/'\n"
    )
    with pytest.raises(ConfigError, match=r"m.toml: jobs.b: dest .*/out is jobs.a's too"):
        load_config(cfg)


def test_two_jobs_with_post_rules_cannot_share_their_outputs_directory(tmp_path: Path) -> None:
    """One's --delete would remove the other's outputs, and a path in both mirrors would
    get one set of outputs for two files."""
    jobs = (
        "[jobs.a]\nurl = 'http://h/a/'\ndest = 'a'\npost_dest = 'out'\n"
        "[jobs.b]\nurl = 'http://h/b/'\ndest = 'b'\npost_dest = '{}'\n"
    )
    rules = "[[jobs.{}.post]]\naction = 'probe'\n"
    cfg = tmp_path / "m.toml"
    for second in ("out", "./out/sub"):
        cfg.write_text(jobs.format(second) + rules.format("a") + rules.format("b"))
        with pytest.raises(ConfigError, match=r"^m.toml: jobs.b: post_dest .*/out.* and jobs.a's"):
            load_config(cfg)
    cfg.write_text(jobs.format("out") + rules.format("a"))  # b makes no outputs: fine
    assert list(load_config(cfg)) == ["a", "b"]
    cfg.write_text(  # each beside its own DEST, by default: fine
        "[jobs.a]\nurl = 'http://h/a/'\ndest = 'a'\n[jobs.b]\nurl = 'http://h/b/'\ndest = 'b'\n"
        + rules.format("a")
        + rules.format("b")
    )
    assert list(load_config(cfg)) == ["a", "b"]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("d1", "link", r"jobs.b: dest .*/link \(.*/d1\) is jobs.a's too"),
        ("d1", "./x/../d1", r"jobs.b: dest .*/x/\.\./d1 \(.*/d1\) is jobs.a's too"),
        ("d1", "d1/inner", r"jobs.b: dest .*/d1/inner and jobs.a's .*/d1 lie one inside the other"),
        ("d1/inner", "link", r"jobs.b: dest .*/link \(.*/d1\) and jobs.a's .*/d1/inner lie one"),
    ],
)
def test_two_jobs_cannot_share_a_dest_by_another_name_or_nest_theirs(
    tmp_path: Path, first: str, second: str, message: str
) -> None:
    (tmp_path / "d1").mkdir()
    (tmp_path / "link").symlink_to("d1")
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f"[jobs.a]\nurl = 'http://h/a/'\ndest = '{first}'\n"
        f"[jobs.b]\nurl = 'http://h/b/'\ndest = '{second}'\n"
    )
    with pytest.raises(ConfigError, match=f"^m.toml: {message}"):
        load_config(cfg)
    cfg.write_text(  # beside each other: fine, however alike their names
        "[jobs.a]\nurl = 'http://h/a/'\ndest = 'd1'\n[jobs.b]\nurl = 'http://h/b/'\ndest = 'd10'\n"
    )
    assert [j.dest.name for j in load_config(cfg).values()] == ["d1", "d10"]


def test_a_config_that_is_not_text_or_not_a_file(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_bytes(b"[jobs.a]\nurl = 'http://h/\xff'\n")
    with pytest.raises(ConfigError, match=r"m.toml: not UTF-8 text \(byte 25\)"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r": cannot read: Is a directory$"):
        load_config(tmp_path)


def test_relative_paths_of_a_config_read_from_a_pipe_are_the_current_directory_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config <(...)`` or ``/dev/stdin``: relative paths resolved against the pipe's
    "directory", /proc/PID/fd, and the run failed with 'cannot create /proc/.../fd/x'."""
    import os

    monkeypatch.chdir(tmp_path)
    r, w = os.pipe()
    try:
        os.write(w, b"[jobs.a]\nurl = 'http://h/pub/'\ndest = 'x'\n[jobs.b]\nurl = 'http://h/b/'\n")
        os.close(w)
        jobs = load_config(Path(f"/dev/fd/{r}"))
    finally:
        os.close(r)
    assert jobs["a"].dest == tmp_path / "x" and jobs["b"].dest == tmp_path / "b"


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A BOM first (Notepad's "UTF-8" does it) was 'not valid TOML: Invalid statement (at
    line 1, column 1)', about a character no editor shows."""
    cfg = tmp_path / "m.toml"
    cfg.write_bytes(b"\xef\xbb\xbf[jobs.a]\nurl = 'http://h/a/'\n")
    assert load_config(cfg)["a"].url == "http://h/a/"


def test_a_config_nested_past_the_parser_s_depth_is_not_valid_toml(tmp_path: Path) -> None:
    """Was tomllib's RecursionError, a traceback, for a broken file."""
    cfg = tmp_path / "m.toml"
    for value in ("[" * 50_000 + "]" * 50_000, "{a = " * 50_000 + "1" + "}" * 50_000):
        cfg.write_text(f"[jobs.a]\nurl = 'http://h/'\ninclude = {value}\n")
        with pytest.raises(ConfigError, match=r"m\.toml: not valid TOML: .* nested too deeply$"):
            load_config(cfg)


@pytest.mark.parametrize(
    ("cpus", "conns", "procs", "threads"),
    [(2, 8, 2, 4), (2, 16, 4, 4), (1, 1, 1, 1), (8, 16, 4, 4), (2, 64, 4, 16), (3, 8, 3, 3)],
)
def test_default_procs_keep_at_most_four_downloads_per_process(
    monkeypatch: pytest.MonkeyPatch, cpus: int, conns: int, procs: int, threads: int
) -> None:
    """One process per CPU, more where a process would run over 4 downloads; at most 4."""
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    job = build_job({"url": "http://h/", "max_connections": conns}, "x")
    assert (job.procs, job.threads) == (procs, threads)
    # every connection has a thread to use it; the cap of N is shared across processes
    assert job.procs * job.threads >= conns and job.max_connections == conns


@pytest.mark.parametrize(
    ("url", "clean", "auth"),
    [
        ("http://h/x/", "http://h/x/", None),
        ("https://u:p%40ss@h:8443/x/", "https://h:8443/x/", ("u", "p@ss")),
        ("http://user@[::1]:8080/x/", "http://[::1]:8080/x/", ("user", "")),
        ("http://a:b:c@h/", "http://h/", ("a", "b:c")),
    ],
)
def test_credentials_leave_the_url_for_the_job(
    url: str, clean: str, auth: tuple[str, str] | None
) -> None:
    job = build_job({"url": url, "dest": "d"}, "x")
    assert (job.url, job.auth, job.transfer().auth) == (clean, auth, auth)
    assert "p@ss" not in repr(job) and "p@ss" not in repr(job.transfer())


def test_a_config_url_refused_is_shown_without_its_password(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[jobs.a]\nurl = 'https://u:s3cret@h:8443x/'\n"
        "[jobs.b]\nurl = 'http://h/'\nproxy = ['http://u:s3cret@p:3128']\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert (
        str(exc.value)
        == 'm.toml: jobs.a.url: expected a port from 0 to 65535 in "https://h:8443x/"'
    )
    cfg.write_text("[jobs.b]\nurl = 'http://h/'\nproxy = ['http://u:s3cret@p:3128']\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert (
        str(exc.value) == "m.toml: jobs.b.proxy: expected a non-empty string, got ['http://p:3128']"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/",
        "http://[::1]:8080/",
        "https://Mirror.Example.ORG:443/x/",
        "http://bücher.example/",
        "http://xn--bcher-kva.example/",
        "http://example.org./",
        "http://localhost/",
        "http://m-2.example/",
        "http://my_mirror.lan:8080/",
    ],
)
def test_hosts_a_connection_can_be_made_to(url: str) -> None:
    assert build_job({"url": url, "proxy": url.rstrip("/x")}, "x").url == url


def test_dask_scheduler_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    dask = {"url": "http://h/", "executor": "dask"}
    for address in ("tcp://10.0.0.1:8786", "tls://[::1]:8786", "wss://sched.example:443", "h:8786"):
        assert build_job({**dask, "scheduler": address}, "x").scheduler == address
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "garbage")
    # the option wins over the environment, which is then not looked at
    assert build_job({**dask, "scheduler": "tcp://h:1"}, "x").scheduler == "tcp://h:1"
    assert build_job({"url": "http://h/"}, "x").scheduler is None  # (local: not needed)
    with pytest.raises(ConfigError, match=r"^\$DASK_SCHEDULER_ADDRESS: expected tcp://HOST:PORT"):
        build_job(dask, "x")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert build_job(dask, "x").scheduler == "tcp://10.0.0.1:8786"


def test_post_rules_of_defaults_and_a_job_join_and_the_command_line_replaces_them(
    tmp_path: Path,
) -> None:
    from fetcher.postrules import parse_post_spec

    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[[defaults.post]]\naction = "probe"\n'
        '[jobs.a]\nurl = "http://h/a/"\n[[jobs.a.post]]\naction = "thumbnails"\n'
    )
    assert [r.action for r in load_config(cfg)["a"].post] == ["probe", "thumbnails"]
    cli = (parse_post_spec("audio"),)
    assert load_config(cfg, overrides={"post": cli})["a"].post == cli
