"""The job runner and the `atr` command: generated --help, flags anywhere, exit codes, one-line failures."""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import socket
import subprocess
import sys
import time
import typing

import pytest
from job_runs import REPO, job_env, run_job, summary_of

from pipeline import cli
from pipeline.config import CompressConfig
from pipeline.config_help import key_lines
from pipeline.failures import describe_failure, redact

JOB_MODULES = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")
HEAVY = ("torch", "ray", "transformers")


def leaf_keys(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted key of a config class and its default."""
    keys = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            keys.update({f"{f.name}.{k}": v for k, v in leaf_keys(type(value)).items()})
        else:
            keys[prefix + f.name] = value
    return keys


# --------------------------------------------------------------------------------------------- --help


def test_compress_help_lists_every_key_with_its_type_and_default_in_under_two_seconds(tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "jobs.compress", "--help"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds, which a busy shared machine does not inflate as it does wall time (about 0.3 s either way).
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for key, default in leaf_keys(CompressConfig).items():
        (line,) = [line for line in lines if line.startswith(f"  {key}  (")]
        shown = default if isinstance(default, str) else json.dumps(default)
        assert line.endswith(f", default {shown})"), line
    assert "  selector.mode  (threshold|ratio|budget|error, default threshold)" in lines
    assert any("clip-vit-l-336" in line and "preset" in line for line in lines)
    assert "  (input=URL is short for input.path=URL)" in lines
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"


def test_every_compress_key_has_a_one_line_doc():
    lines = key_lines(CompressConfig)
    undocumented = [line.split()[0] for line, after in zip(lines, [*lines[1:], ""])
                    if re.match(r"^  [\w.]+  \(", line) and not after.startswith("      ")]
    assert undocumented == []


@pytest.mark.parametrize("job", JOB_MODULES)
def test_help_of_every_job_imports_no_torch_ray_or_transformers(job, tmp_path):
    probe = (f"import runpy, sys; sys.argv = ['x', '--help']\n"
             f"try:\n    runpy.run_module('jobs.{job}', run_name='__main__')\nexcept SystemExit as e:\n"
             f"    assert e.code == 0, e.code\n"
             f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "keys (type, default)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------------------------- arguments


def test_flags_come_anywhere_and_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ here: the packaged one is used
    cfg, debug = cli.parse_args(CompressConfig, ["input=/in", "--dry-run", "output=/out", "--config",
                                                 "conf/compress.yaml", "selector.method=random", "--debug"],
                                "compress", {"--dry-run": "dry_run"})
    assert (cfg.dry_run, debug, cfg.input.path, cfg.output.path, cfg.selector.method) == \
        (True, True, "/in", "/out", "random")
    assert cfg.executor == "ray" and cfg.encoder.name == "tiny"  # what conf/compress.yaml sets
    cfg, debug = cli.parse_args(CompressConfig, ["--config", "compress"], "compress", {})
    assert not debug and cfg.input.path == "demo_output/corpus/train"


def test_a_missing_config_file_names_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="compress.yaml, evaluate.yaml"):
        cli.parse_args(CompressConfig, ["--config", "nope.yaml"], "compress", {})


def test_unknown_flag_is_a_usage_error(tmp_path):
    proc = run_job("compress", "--nope", cwd=tmp_path)
    assert proc.returncode == 2


def test_bare_s3_input_is_a_usage_error_in_one_line(tmp_path):
    proc = run_job("compress", "input.path=s3://", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: input.path: 's3://' names no bucket; give s3://BUCKET/PREFIX/..."]


# --------------------------------------------------------------------------------------------- the atr command


def test_atr_lists_every_job_as_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert cli.job_names() == sorted(j.replace("_", "-") for j in JOB_MODULES)
    for name in cli.job_names():
        assert f"\n  {name} " in out


def test_atr_unknown_job_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compres"])
    assert exit_info.value.code == 2
    assert "unknown job; jobs: compress," in capsys.readouterr().err


def test_atr_runs_the_job_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-corpus", f"output={tmp_path / 'c'}", "n=4", "shard_size=4", "image_size=64"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["heldout", "train"]


# --------------------------------------------------------------------------------------------- failures


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_aws_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in job_env().items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", **extra}


def assert_one_line_failure(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "resolved config" not in line]
    assert len(lines) == 1, "\n".join(lines[-40:])
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if code == 1:
        assert summary_of(proc)["status"] == "failed"
    return lines[0]


def test_no_s3_credentials_is_one_line_naming_the_url_and_the_fix(tmp_path):
    proc = run_job("compress", "input=s3://atr-test-bucket/in", f"output={tmp_path / 'out'}", "executor=local",
                   "selector.method=random", env=no_aws_env(), cwd=tmp_path)
    assert_one_line_failure(proc, 1, "no S3 credentials", "s3://atr-test-bucket/in", "AWS_ACCESS_KEY_ID", "IRSA")
    assert "atr-test-bucket" in summary_of(proc)["error"]


def test_debug_prints_the_traceback_before_the_one_line(tmp_path, monkeypatch, capfd):
    import s3fs

    for name, value in no_aws_env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        proc = compress_in_process(capfd, "input=s3://atr-test-bucket/in", "--debug", f"output={tmp_path / 'out'}",
                                   "executor=local", "selector.method=random")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "NoCredentialsError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no S3 credentials for input.path=s3://atr-test")


def compress_in_process(capfd, *argv: str) -> subprocess.CompletedProcess:
    """``jobs.compress`` through the runner in this process (torch already imported: seconds, not ten)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_job("pipeline.compress.run:run_compress", CompressConfig, argv=list(argv), prog="compress",
                    flags={"--dry-run": "dry_run"})
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, out, err)


def test_unreachable_endpoint_is_one_line_naming_it(tmp_path, monkeypatch, capfd):
    import s3fs

    endpoint = f"http://127.0.0.1:{_unused_port()}"
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAATRFAKEKEY000000", "AWS_SECRET_ACCESS_KEY": "atr-fake-secret",
                        "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        proc = compress_in_process(capfd, "input=s3://atr-test-bucket/in", f"output={tmp_path / 'out'}",
                                   "executor=local", "selector.method=random", f"storage.endpoint_url={endpoint}")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    line = assert_one_line_failure(proc, 1, f"cannot reach {endpoint}", "storage.endpoint_url",
                                   "s3://atr-test-bucket/in")
    assert "atr-fake-secret" not in line + proc.stdout


def test_hub_preset_offline_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = compress_in_process(capfd, "encoder=clip-vit-l-336", "--dry-run", "selector.method=random",
                               f"input={tmp_path}", f"output={tmp_path / 'out'}")
    assert_one_line_failure(proc, 1, "openai/clip-vit-large-patch14-336", "HF_HUB_OFFLINE is set",
                            "encoder.pretrained=null")
    assert "couldn't connect" not in proc.stderr


@pytest.mark.parametrize("setting", ["local_files_only", "no_network"])
def test_hub_preset_without_network_fails_in_one_line_without_retries(tmp_path, monkeypatch, capfd, setting):
    hub = f"http://127.0.0.1:{_unused_port()}"  # nothing listens: a host without network, as the hub sees it
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    override = ["encoder.local_files_only=true"] if setting == "local_files_only" else []
    started = time.monotonic()
    proc = compress_in_process(capfd, "encoder=clip-vit-l-336", *override, "--dry-run", "selector.method=random",
                               f"input={tmp_path}", f"output={tmp_path / 'out'}")
    elapsed = time.monotonic() - started
    why = "local_files_only=true" if override else f"{hub} is unreachable"
    assert_one_line_failure(proc, 1, why, "Hugging Face cache", "encoder.pretrained=null")
    assert "Retrying" not in proc.stderr and "couldn't connect" not in proc.stderr
    assert elapsed < 15, elapsed  # one refused connection, not huggingface_hub's five retries (23 s)


def test_describe_failure_classifies_botocore_and_aiohttp_errors():
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    config = {"input": {"path": "s3://b/in"}, "output": {"path": "s3://u:p@b/out"}, "storage": {}}
    assert describe_failure(NoCredentialsError(), config)[0] == 1
    assert "s3://b/out" in describe_failure(NoCredentialsError(), config)[1]
    assert "u:p" not in describe_failure(NoCredentialsError(), config)[1]
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://10.0.0.9:9000/b?list-type=2")
        except EndpointConnectionError as exc:
            raise OSError("wrapped") from exc
    except OSError as wrapped:
        code, message = describe_failure(wrapped, config)
    assert code == 1 and message.startswith("cannot reach http://10.0.0.9:9000 for")
    denied = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "x"}}, "ListObjectsV2")
    assert "refused (InvalidAccessKeyId)" in describe_failure(denied, config)[1]
    assert describe_failure(ValueError("a bug"), config) is None
    assert redact("https://user:secret@host/x") == "https://host/x"
