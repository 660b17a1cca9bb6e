"""Hardening: credentials stay out of logs and outputs, tar member names never become paths, no pickle."""

from __future__ import annotations

import ast
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
import s3fs
from job_runs import (
    FAST_COMPRESS,
    REPO,
    job_env,
    manifest_keys,
    run_job,
    stored_text,
    summary_of,
)
from PIL import Image

from pipeline.cli import run_job as run_job_in_process
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, CorpusConfig, load_config
from pipeline.corpus import write_corpus, write_shard
from pipeline.storage import filesystem_for


def jpeg_bytes(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def fake_credentials() -> dict[str, str]:
    tag = uuid.uuid4().hex.upper()
    return {"AWS_ACCESS_KEY_ID": f"AKIAATRFAKE{tag[:12]}", "AWS_SECRET_ACCESS_KEY": f"atr-fake-secret-{tag}"}


@pytest.mark.slow
def test_credentials_never_reach_logs_config_markers_manifest_stats_or_data(tmp_path, s3_bucket, s3_options, s3_server):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=4, shard_size=4, heldout_fraction=0.0, seed=1))
    # A second shard with an undecodable image, so a quarantine file and its reason are written and checked too.
    write_shard(corpus / "train" / "shard-bad.tar", [("ok.jpg", jpeg_bytes()), ("broken.jpg", b"\xff\xd8 not a jpeg")])
    fs, _ = filesystem_for(f"s3://{s3_bucket}", s3_options)
    for tar in sorted((corpus / "train").glob("*.tar")):
        fs.put_file(str(tar), f"{s3_bucket}/corpus/{tar.name}")
    credentials = fake_credentials()

    proc = run_job("compress", f"input.path=s3://{s3_bucket}/corpus", f"output.path=s3://{s3_bucket}/out",
                   f"storage.endpoint_url={s3_server}", "executor=local", *FAST_COMPRESS, env=job_env(**credentials))

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["images"], summary["quarantined"]) == (5, 1)  # the job really read and wrote with them
    fs.invalidate_cache()
    stored = sorted(fs.find(f"{s3_bucket}/out"))
    names = {path.rsplit("/", 1)[-1] for path in stored}
    assert {"_config.json", "manifest.parquet", "stats.json"} <= names
    assert any("/_committed/" in p for p in stored) and any("/quarantine/" in p for p in stored)
    texts = {"stdout": proc.stdout, "stderr": proc.stderr, **{path: stored_text(fs, path) for path in stored}}
    for value in credentials.values():
        leaks = [where for where, text in texts.items() if value in text]
        assert leaks == [], f"credential found in {leaks}"


def test_a_failing_run_reports_without_credentials(tmp_path, s3_server, monkeypatch, capfd):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=4, shard_size=4, heldout_fraction=0.0, seed=1))
    credentials = fake_credentials()
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would hold the fixture's keys, not these

    with pytest.raises(SystemExit) as exit_info:
        run_job_in_process(run_compress, prog="compress", argv=[
            f"input.path={corpus / 'train'}", f"output.path=s3://atr-no-such-bucket-{uuid.uuid4().hex[:8]}/out",
            f"storage.endpoint_url={s3_server}", "executor=local", *FAST_COMPRESS])

    s3fs.S3FileSystem.clear_instance_cache()
    out, err = capfd.readouterr()
    assert exit_info.value.code == 1
    assert json.loads(out.strip().splitlines()[-1])["status"] == "failed"
    assert "NoSuchBucket" in out + err or "does not exist" in out + err
    for value in credentials.values():
        assert value not in out + err


def test_credentials_in_the_endpoint_url_are_redacted_where_the_config_is_shown(tmp_path, capfd):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=4, shard_size=4, heldout_fraction=0.0, seed=1))
    secret = f"secret{uuid.uuid4().hex}"
    with pytest.raises(SystemExit) as exit_info:
        run_job_in_process(run_compress, prog="compress", argv=[
            f"input.path={corpus / 'train'}", f"output.path={tmp_path / 'out'}", "executor=local",
            f"storage.endpoint_url=https://AKIAFAKEKEY:{secret}@minio.internal:9000", *FAST_COMPRESS])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0
    assert '"endpoint_url": "https://***@minio.internal:9000"' in err
    stored = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.json"))
    assert "***@minio.internal" in stored
    for text in (out, err, stored):
        assert secret not in text and "AKIAFAKEKEY" not in text


def hostile_tar(path: Path, sandbox: Path, tag: str) -> dict[str, str]:
    """Members whose names would land outside any extraction folder; returns {purpose: key the reader sees}."""
    names = {"good": "good.jpg", "parent": f"../escape-{tag}.jpg", "absolute": f"{sandbox}/abs-{tag}.jpg",
             "deep": f"a/../../../deep-{tag}.jpg"}
    with tarfile.open(path, "w") as tar:
        for name in names.values():
            data = jpeg_bytes()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        for kind, name, target in ((tarfile.SYMTYPE, "link.jpg", "/etc/passwd"),
                                   (tarfile.LNKTYPE, "hard.jpg", f"../escape-{tag}.jpg"),
                                   (tarfile.DIRTYPE, f"../dir-{tag}", "")):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            tar.addfile(member)
    return {purpose: name.rsplit(".", 1)[0] for purpose, name in names.items()}


@pytest.mark.parametrize("output_format", ["parquet", "webdataset"])
def test_tar_member_names_are_keys_never_paths(tmp_path, monkeypatch, output_format):
    sandbox = tmp_path / "sandbox"
    workdir = sandbox / "work" / "cwd"  # the job runs two levels down, so every traversal stays inside the sandbox
    workdir.mkdir(parents=True)
    (sandbox / "in").mkdir()
    tag = uuid.uuid4().hex[:8]
    keys = hostile_tar(sandbox / "in" / "shard-00000.tar", sandbox, tag)
    monkeypatch.chdir(workdir)
    before = sorted(p.relative_to(sandbox) for p in sandbox.rglob("*"))

    cfg = load_config(CompressConfig, None, [f"input.path={sandbox / 'in'}", f"output.path={sandbox / 'out'}",
                                             "executor=local", f"output.format={output_format}", *FAST_COMPRESS])
    summary = run_compress(cfg)

    created = sorted(p.relative_to(sandbox) for p in sandbox.rglob("*"))
    assert [p for p in created if p not in before and p.parts[0] != "out"] == []
    assert not list(sandbox.rglob(f"*{tag}*"))
    # Links and directories are skipped; the regular members are samples, whatever their names say, and one key
    # policy rejects the ones that read as paths before either output format sees them: the same rows for both.
    assert (summary["images"], summary["quarantined"], summary["input_samples"]) == (1, len(keys) - 1, len(keys))
    out = Path(summary["output"])
    if output_format == "parquet":
        assert manifest_keys(str(out)) == ["good"]
        return
    # A WebDataset output names its members after keys: a key that is not a plain name must not become one.
    members = []
    for data_file in (out / "data").glob("*.tar"):
        with tarfile.open(data_file) as tar:
            members += tar.getnames()
    assert {name.split(".")[0] for name in members} == {"good"}


# ------------------------------------------------------------------------------------------- no pickle

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(tree: ast.AST) -> list[str]:
    """Imports of pickle-like modules, ``torch.load`` without ``weights_only=True``, ``allow_pickle=True``,
    ``read_pickle`` and ``trust_remote_code=True``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            flags = {k.arg: k.value for k in node.keywords}
            if ((name.endswith("torch.load") and not is_constant(flags.get("weights_only"), True))
                    or name.endswith("read_pickle")
                    or any(f in flags and not is_constant(flags[f], False) for f in ("allow_pickle", "trust_remote_code"))):
                found.append(ast.unparse(node))
    return found


def test_unsafe_call_detector_catches_what_it_should():
    source = ("import pickle\nfrom joblib import load\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
              "np.load(f, allow_pickle=True)\npd.read_pickle(f)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
              "torch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\n")
    assert len(unsafe_calls(ast.parse(source))) == 7


def test_no_pickle_where_data_or_checkpoints_are_read():
    sources = [p for folder in ("pipeline", "jobs", "bench") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(sources) > 10
    found = {str(p.relative_to(REPO)): calls for p in sources if (calls := unsafe_calls(ast.parse(p.read_text())))}
    assert found == {}
