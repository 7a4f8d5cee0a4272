"""`align serve-reward`: argument handling and the refusal to expose a scorer without a token (nothing binds)."""

import argparse

import pytest

import reward.server
from alignment.errors import RewardError
from reward import cli


def parse(argv):
    parser = argparse.ArgumentParser(prog="align")
    cli.add_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def served(monkeypatch):
    """Record what would be served instead of binding a socket."""
    calls = []
    monkeypatch.setattr(reward.server, "serve", lambda source, **kwargs: calls.append((source, kwargs)))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("uvicorn.run must not be reached"))
    return calls


def test_defaults_serve_on_loopback_without_a_token(served):
    args = parse(["serve-reward", "answer_match"])
    assert args.func(args) == 0
    assert served == [("answer_match", {"host": "127.0.0.1", "port": 8000, "token_env": None,
                                          "protocol": "align"})]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_non_loopback_host_without_a_token_is_refused_before_anything_is_served(served, host):
    args = parse(["serve-reward", "answer_match", "--host", host])
    with pytest.raises(RewardError, match="refusing to serve on non-loopback host"):
        args.func(args)
    assert served == []


def test_refusal_holds_even_if_the_server_would_not_check(monkeypatch):
    """The CLI checks itself: with the real serve replaced by one that would bind, nothing is bound."""
    monkeypatch.setattr(reward.server, "serve", lambda *a, **k: pytest.fail("serve must not be called"))
    args = parse(["serve-reward", "examples/rewards/brevity.py:brevity", "--host", "0.0.0.0", "--port", "9"])
    with pytest.raises(RewardError, match="--token-env"):
        args.func(args)


def test_token_env_must_be_set_and_then_any_host_is_allowed(served, monkeypatch):
    monkeypatch.delenv("RM_TEST_TOKEN", raising=False)
    args = parse(["serve-reward", "answer_match", "--host", "0.0.0.0", "--port", "8123", "--token-env", "RM_TEST_TOKEN"])
    with pytest.raises(RewardError, match="RM_TEST_TOKEN"):
        args.func(args)
    monkeypatch.setenv("RM_TEST_TOKEN", "s3cret")
    assert args.func(args) == 0
    assert served == [("answer_match", {"host": "0.0.0.0", "port": 8123, "token_env": "RM_TEST_TOKEN",
                                          "protocol": "align"})]


def test_align_main_reports_the_refusal_as_an_error(served, capsys, monkeypatch):
    from alignment import cli as align_cli

    assert cli.add_command in align_cli.extra_commands()
    assert align_cli.main(["serve-reward", "answer_match", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve" in capsys.readouterr().err
    assert served == []


@pytest.mark.parametrize("protocol", ["openrlhf", "llamafactory"])
def test_protocol_option_reaches_the_server(served, protocol):
    args = parse(["serve-reward", "answer_match", "--protocol", protocol])
    assert args.func(args) == 0
    assert served[0][1]["protocol"] == protocol


def test_unknown_protocol_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(["serve-reward", "answer_match", "--protocol", "grpc"])
    assert "invalid choice: 'grpc'" in capsys.readouterr().err
