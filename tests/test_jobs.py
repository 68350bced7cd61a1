from __future__ import annotations

import json

import pytest

from daemon.addresses import AzAddress, S3Address, parse_azure, parse_s3
from daemon.errors import AddressError, JobFileError
from daemon.jobs import KeyFilter, Overwrite, make_spec, parse_job


def test_s3_addresses() -> None:
    assert parse_s3("s3://bucket/a/b.bin") == S3Address("bucket", "a/b.bin")
    assert parse_s3("s3://bucket/a/").is_prefix
    assert parse_s3("s3://bucket/").is_prefix
    assert not parse_s3("s3://bucket/a").is_prefix
    for bad in ("bucket/key", "s3:///key", "s3://ab/key", "https://bucket/key"):
        with pytest.raises(AddressError):
            parse_s3(bad)


def test_azure_addresses() -> None:
    assert parse_azure("az://ctr/x/y.bin") == AzAddress("ctr", "x/y.bin")
    real = parse_azure("https://acct.blob.core.windows.net/ctr/dir/file%20name.bin")
    assert real == AzAddress("ctr", "dir/file name.bin", "https://acct.blob.core.windows.net")
    emu = parse_azure("http://127.0.0.1:10000/devstoreaccount1/ctr/blob")
    assert emu == AzAddress("ctr", "blob", "http://127.0.0.1:10000/devstoreaccount1")
    for bad in (
        "az://UPPER/x",
        "az://a/x",
        "az://has--two/x",
        "ftp://x/y",
        "az:///blob",
        "https://acct.blob.core.windows.net/ctr/b?sv=secret",
    ):
        with pytest.raises(AddressError):
            parse_azure(bad)
    for renamed in ("az://ctr/a/./b", "az://ctr/../b", "az://ctr/a/..", "az://ctr/./"):
        with pytest.raises(AddressError, match="resolved away by Azure"):
            parse_azure(renamed)
    with pytest.raises(AddressError, match="control characters"):
        parse_azure("az://ctr/a\tb")
    with pytest.raises(AddressError, match="at most 1024"):
        parse_azure("az://ctr/" + "x" * 1025)
    for fine in ("az://ctr/.a/b..c/d.", "az://ctr/a//b", "az://ctr/dir/", "az://ctr/"):
        assert parse_azure(fine).blob == fine.removeprefix("az://ctr/")


def test_specs_prefixes_and_folders() -> None:
    spec = make_spec("s3://bucket/in/", "az://ctr/out/")
    assert spec.for_key("in/a/b c+d.bin").destination == AzAddress("ctr", "out/a/b c+d.bin")
    one = make_spec("s3://bucket/in/file.bin", "az://ctr/out/")
    assert one.destination == AzAddress("ctr", "out/file.bin")
    with pytest.raises(AddressError, match="must be one too"):
        make_spec("s3://bucket/in/", "az://ctr/out")


def test_both_job_shapes() -> None:
    single = parse_job(
        '{"source": "s3://bucket/k", "destination": "az://ctr/k", "overwrite": "never"}'
    )
    assert [s.overwrite for s in single] == [Overwrite.NEVER]
    assert (
        parse_job('{"source": "s3://bucket/k", "destination": "az://ctr/k"}')[0].overwrite
        is Overwrite.IF_CHANGED
    )
    many = parse_job(
        json.dumps(
            {
                "transfers": [
                    {"source": "s3://bucket/a", "destination": "az://ctr/a"},
                    {"source": "s3://bucket/p/", "destination": "az://ctr/q/"},
                ]
            }
        )
    )
    assert len(many) == 2 and many[1].source.is_prefix


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "colour": 1}',
            "colour: unknown field",
        ),
        ('{"transfers": []}', "transfers"),
        ('{"source": "s3://bucket/k"}', "both source and destination"),
        ('{"source": "gs://bucket/k", "destination": "az://ctr/k"}', "must start with s3://"),
        ('{"transfers": [{"source": "s3://bucket/k", "destination": "az://C/k"}]}', "transfers.0"),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "overwrite": "sometimes"}',
            "overwrite",
        ),
        ('{"source": 5, "destination": "az://ctr/k"}', "source"),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "metadata": {"bad-name": "x"}}',
            "C# identifier",
        ),
        ('{"source": "s3://bucket/k", "destination": "az://ctr/k", "tier": "Frozen"}', "tier"),
        # Azure refuses such header values; given in a job they used to be left off the
        # blob at copy time, a note in the report, instead of an error here.
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "metadata": {"who": "\u017e"}}',
            "metadata 'who' must be printable ASCII",
        ),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "content_type": "a/b\\n"}',
            "content_type must be printable ASCII",
        ),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "include": ["*.csv"]}',
            "include and exclude choose objects under a prefix, and s3://bucket/k is one object",
        ),
        (
            '{"transfers": [{"source": "s3://bucket/k", "destination": "az://ctr/k", '
            '"exclude": ["x"]}]}',
            "transfers.0: include and exclude choose objects under a prefix",
        ),
        (
            '{"source": "s3://bucket/p/", "destination": "az://ctr/p/", "include": ["a[b"]}',
            "include: pattern 'a\\[b' opens a \\[set\\] it does not close",
        ),
        ('{"source": "s3://bucket/p/", "destination": "az://ctr/p/", "exclude": [""]}', "exclude"),
        ('{"source": "s3://bucket/p/", "destination": "az://ctr/p/", "include": "*.csv"}', "list"),
        (
            '{"source": "s3://bucket/k", "destination": "az://ctr/k", "dry_run": "yes"}',
            "dry_run: Input should be a valid boolean",
        ),
        ("[" * 100000 + "]" * 100000, "JSON"),
        (b"\xff\xfe not utf8", "not valid JSON"),
    ],
)
def test_bad_job_files_say_why(text: str | bytes, reason: str) -> None:
    with pytest.raises(JobFileError, match=reason.replace("(", r"\(")):
        parse_job(text)


def test_job_level_options_are_defaults_for_each_transfer() -> None:
    [a, b] = parse_job(
        json.dumps(
            {
                "metadata": {"team": "ops", "env": "prod"},
                "content_type": "text/csv",
                "tier": "Cool",
                "dry_run": True,
                "transfers": [
                    {"source": "s3://bucket/a", "destination": "az://ctr/a"},
                    {
                        "source": "s3://bucket/b",
                        "destination": "az://ctr/b",
                        "tier": "Archive",
                        "metadata": {"env": "dev"},
                        "overwrite": "always",
                        "dry_run": False,
                    },
                ],
            }
        )
    )
    assert (a.options.tier, a.options.content_type, dict(a.options.metadata)) == (
        "Cool",
        "text/csv",
        {"team": "ops", "env": "prod"},
    )
    assert (b.options.tier, b.overwrite, dict(b.options.metadata)) == (
        "Archive",
        Overwrite.ALWAYS,
        {"team": "ops", "env": "dev"},
    )
    assert (a.options.dry_run, b.options.dry_run) == (True, False)
    [plain] = parse_job('{"source": "s3://bucket/a", "destination": "az://ctr/a"}')
    assert plain.options.dry_run is False


def test_two_transfers_of_one_job_may_not_write_one_blob() -> None:
    for second in ("az://ctr/x", "az://ctr/"):  # the second: a prefix, and b's name is x
        doc = {
            "transfers": [
                {"source": "s3://bucket/a", "destination": "az://ctr/x"},
                {"source": "s3://bucket/in/x", "destination": second},
            ]
        }
        with pytest.raises(JobFileError, match=r"transfers.0 and transfers.1 both write"):
            parse_job(json.dumps(doc))
    fine = {
        "transfers": [
            {"source": "s3://bucket/in/", "destination": "az://ctr/x/"},
            {"source": "s3://bucket/more/", "destination": "az://ctr/x/"},
            {"source": "s3://bucket/a", "destination": "az://ctr/a"},
        ]
    }
    assert len(parse_job(json.dumps(fine))) == 3  # prefixes are checked as they list


@pytest.mark.parametrize(
    ("pattern", "key", "chosen"),
    [
        ("*.csv", "a.csv", True),
        ("*.csv", "2026/11/a.csv", True),  # no /: the file name, at any depth
        ("*.csv", "a.csv.tmp", False),
        ("/*.csv", "2026/a.csv", False),  # a leading /: from the prefix only
        ("/*.csv", "a.csv", True),
        ("logs/**", "logs/a/b.txt", True),
        ("logs/**", "old/logs/a", False),
        ("**/tmp/*", "tmp/a", True),
        ("**/tmp/*", "x/y/tmp/a", True),
        ("**/tmp/*", "x/tmp/a/b", False),  # * stays within a segment
        ("part-?.bin", "part-1.bin", True),
        ("part-?.bin", "part-10.bin", False),
        ("[!_]*", "_SUCCESS", False),
        ("[a-c]*", "b.txt", True),
        ("a.b", "axb", False),  # . is itself
    ],
)
def test_include_patterns(pattern: str, key: str, chosen: bool) -> None:
    assert KeyFilter.of([pattern], []).admits(key) is chosen
    assert KeyFilter.of([], [pattern]).admits(key) is not chosen


def test_a_transfers_own_filters_replace_the_jobs() -> None:
    [a, b, c] = parse_job(
        json.dumps(
            {
                "include": ["*.csv"],
                "exclude": ["tmp/**"],
                "transfers": [
                    {"source": "s3://bucket/a/", "destination": "az://ctr/a/"},
                    {"source": "s3://bucket/b/", "destination": "az://ctr/b/", "include": ["*"]},
                    {"source": "s3://bucket/c", "destination": "az://ctr/c"},
                ],
            }
        )
    )
    assert a.options.keys == KeyFilter.of(["*.csv"], ["tmp/**"])
    assert b.options.keys == KeyFilter.of(["*"], ["tmp/**"])
    # The job's filters are for its prefixes; its one-object transfer is copied as named.
    assert c.options.keys is not None and not c.source.is_prefix
