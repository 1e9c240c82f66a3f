"""The configuration: the shipped defaults parse, mistakes name their key path, relative paths
follow the config file, and `plugin config check` says what would stop `plugin serve`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from plugin.cli import main
from plugin.config import (
    ConfigError,
    ensemble_spec,
    load_config,
    machine_cpus,
    parse_config,
    resolve_secret,
)
from plugin.outputs.common import OutputKind

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_data() -> dict:
    return yaml.safe_load((REPO / "config.yml").read_text())


def test_default_config_is_embedded_and_complete() -> None:
    config = load_config(REPO / "config.yml")
    assert config.listener.ae_title == "MAMMO_AI" and config.listener.port == 11112
    assert config.storage.spool == REPO / "var" / "spool"
    assert [m.path for m in config.models.members] == [
        REPO / "models/weights/demo-gmic.safetensors",
        REPO / "models/weights/demo-allconv.safetensors",
        REPO / "models/weights/demo-glimpsenet.safetensors",
    ]
    assert config.models.device == "auto" and config.models.precision == "fp32"
    assert [r.destination.type for r in config.destinations] == ["folder"]
    assert config.output_kinds == [
        OutputKind.CAD_SR,
        OutputKind.TID1500,
        OutputKind.SEG,
        OutputKind.SC,
    ]
    # Compressed syntaxes come first so compressed mammograms are stored as received.
    assert config.listener.transfer_syntaxes[0] == "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["listener"].update(prot=1), "listener.prot: unknown key"),
        (lambda d: d["listener"].update(port=70000), "listener.port: Input should be less"),
        (lambda d: d["listener"].update(ae_title="A" * 17), "listener.ae_title: an AE title"),
        (
            lambda d: d["models"]["members"][1].update(flips=["none", "none"]),
            "models.members.1.flips: list each flip once",
        ),
        (lambda d: d["models"].update(precision="fp8"), "models.precision: Input should be"),
        (
            lambda d: d["exams"].update(settle_seconds=100),
            "exams: need settle_seconds <= quiet_seconds",
        ),
        (lambda d: d["destinations"][0].update(outputs=["pdf"]), "destinations.0.outputs.0"),
        (lambda d: d["destinations"][0].update(pth="x"), "destinations.0.pth: unknown key"),
        (
            lambda d: d["destinations"].append(dict(d["destinations"][0])),
            "names must be unique, repeated: results-folder",
        ),
        (lambda d: d.update(extra_section={}), "extra_section: unknown key"),
        (
            lambda d: d["storage"].update(database="postgresql://u:pw@db/mammo"),
            "storage.database: put no password in the URL",
        ),
        (
            lambda d: d["storage"].update(database="postgresql://u@db"),
            "storage.database: a PostgreSQL URL names a host and a database",
        ),
        (
            lambda d: d.setdefault("worker", {}).update(devices=["cuda:0", "cuda:0"]),
            "worker.devices: list each device once",
        ),
        (lambda d: d.setdefault("worker", {}).update(devices=["gpu0"]), "worker.devices.0"),
        (
            lambda d: d["worker"].update(decode_processes=-1),
            "worker.decode_processes: Input should be greater than or equal to 0",
        ),
        (lambda d: d["worker"].update(max_exams_in_flight=0), "worker.max_exams_in_flight"),
        (lambda d: d["models"].update(max_batch_wait_ms=-5), "models.max_batch_wait_ms"),
        (lambda d: d.update(node={"name": "a b"}), "node.name: String should match"),
    ],
)
def test_mistakes_name_the_key(default_data: dict, edit, expected: str) -> None:
    data = copy.deepcopy(default_data)
    edit(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, REPO, "test.yml")
    assert expected in str(info.value)


def test_pipeline_defaults_come_from_the_machine(default_data: dict) -> None:
    cpus = machine_cpus()
    config = parse_config(default_data, REPO)
    worker = config.worker
    if cpus < 4:  # the ensemble's threads take every core: the stages run in threads
        assert (worker.decoders, worker.builders) == (0, 0)
    else:
        assert (worker.decoders, worker.builders) == (min(8, cpus // 2), max(1, min(8, cpus // 4)))
    data = copy.deepcopy(default_data)
    # Each pool busy with one exam and one waiting, plus a batch: 8 images = 2 exams.
    data["worker"].update(decode_processes=2, output_processes=1)
    assert parse_config(data, REPO).worker.in_flight(8) == 2 * (2 + 1) + 2
    # Every stage in the worker's threads: one exam at a time has all the cores.
    data["worker"].update(decode_processes=0, output_processes=0)
    assert parse_config(data, REPO).worker.in_flight(8) == 1
    data["worker"].update(decode_processes=0, output_processes=3, max_exams_in_flight=5)
    worker = parse_config(data, REPO).worker
    assert (worker.decoders, worker.builders, worker.in_flight(64)) == (0, 3, 5)
    spec = ensemble_spec(config.models)
    # GMIC faces every breast one way, so its mirror image is the vertical one.
    assert [m.flips for m in spec.members] == [("none", "vflip")] + [("none", "hflip")] * 2
    assert (spec.device, spec.precision, spec.max_batch) == ("auto", "fp32", 8)
    assert (spec.channels_last, spec.compile) == (False, False)
    data = copy.deepcopy(default_data)
    data["models"].update(precision="tf32", channels_last=True, compile=True)
    spec = ensemble_spec(parse_config(data, REPO).models)
    assert (spec.precision, spec.channels_last, spec.compile) == ("tf32", True, True)


def test_relative_paths_follow_the_config_file(tmp_path: Path, default_data: dict) -> None:
    data = copy.deepcopy(default_data)
    data["models"]["members"] = [{"path": "m/a.safetensors"}]
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "site.yml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.models.members[0].path == tmp_path / "sub" / "m" / "a.safetensors"
    assert config.models.members[0].flips == ["none"]
    assert config.destinations[0].destination.path == tmp_path / "sub" / "results"
    assert config.observability.audit_log == tmp_path / "sub" / "var" / "audit.jsonl"


def test_yaml_errors_and_missing_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file; pass --config"):
        load_config(tmp_path / "absent.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("listener: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_secrets_come_from_named_environment_variables(monkeypatch) -> None:
    assert resolve_secret(None, "x") is None
    monkeypatch.setenv("MAMMO_TEST_SECRET", "s3cret")
    assert resolve_secret("MAMMO_TEST_SECRET", "x") == "s3cret"
    monkeypatch.delenv("MAMMO_TEST_SECRET")
    with pytest.raises(
        ConfigError,
        match="password_env names environment variable MAMMO_TEST_SECRET, which is not set",
    ):
        resolve_secret("MAMMO_TEST_SECRET", "destinations.0.password_env")


def test_config_check_command(tmp_path: Path, default_data: dict, capsys) -> None:
    data = copy.deepcopy(default_data)
    gmic = str(REPO / "models/weights/demo-gmic.safetensors")
    data["models"]["members"] = [
        {"path": "missing.safetensors"},
        {"path": gmic, "flips": ["none", "hflip"]},
    ]
    data["destinations"].append(
        {
            "type": "orthanc",
            "name": "orthanc",
            "url": "http://localhost:8042",
            "username": "ai",
            "password_env": "MAMMO_TEST_UNSET_PASSWORD",
        }
    )
    path = tmp_path / "site.yml"
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "models.members.0.path: no model file at" in out
    # GMIC turns every breast to face one way: a horizontal flip shows it a breast it never sees.
    assert (
        "models.members.1: ensemble member demo-gmic (" + gmic + "): gmic's preprocessing never "
        "gives its models an image flipped by hflip"
    ) in out
    assert "choose its flips from none, vflip" in out
    assert "MAMMO_TEST_UNSET_PASSWORD" in out

    data["listener"]["bogus"] = 1
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == 1
    assert "listener.bogus: unknown key" in capsys.readouterr().out


def test_storage_takes_a_sqlite_path_or_a_postgresql_url(
    tmp_path: Path, default_data: dict, monkeypatch
) -> None:
    data = copy.deepcopy(default_data)
    config = parse_config(data, tmp_path)
    assert config.storage.database == tmp_path / "var" / "plugin.sqlite"
    assert not config.storage.postgres and config.storage.password() is None
    data["storage"].update(
        database="postgresql://mammo@db.example:5433/mammo", password_env="MAMMO_DB_PW"
    )
    config = parse_config(data, tmp_path)
    assert config.storage.database == "postgresql://mammo@db.example:5433/mammo"
    assert config.storage.postgres
    with pytest.raises(ConfigError, match="MAMMO_DB_PW, which is not set"):
        config.storage.password()
    monkeypatch.setenv("MAMMO_DB_PW", "pw")
    assert config.storage.password() == "pw"
