"""The versioned store: publishing, integrity, aliases, resolution and name safety."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cellinspect.models import store as store_module
from cellinspect.models.card import ModelCard
from cellinspect.models.store import (
    ALIASES_LOG,
    IntegrityError,
    ModelNotFoundError,
    ModelRef,
    ModelStore,
    parse_model_ref,
    sha256_file,
)


def _entries(store: ModelStore, name: str = "tiny") -> list[str]:
    return sorted(p.name for p in (store.root / name).iterdir())


# ---- publishing -------------------------------------------------------------------------


def test_publish_allocates_versions_1_2_3(store, onnx_model, card):
    cards = [store.publish(onnx_model, card) for _ in range(3)]
    assert [c.version for c in cards] == ["1", "2", "3"]
    assert store.versions("tiny") == ["1", "2", "3"]
    for c in cards:
        version_dir = store.root / "tiny" / c.version
        assert sorted(p.name for p in version_dir.iterdir()) == ["card.json", "model.onnx"]
        assert c.onnx_sha256 == sha256_file(onnx_model)
        assert ModelCard.load(version_dir / "card.json") == c
    assert card.version == "unpublished"  # the caller's card is not mutated


def test_publish_never_overwrites_an_existing_version(store, onnx_model, card, tiny, tmp_path):
    store.publish(onnx_model, card)
    first = (store.root / "tiny" / "1" / "model.onnx").read_bytes()
    other = tiny.build_classifier(tmp_path / "other.onnx", bias=np.zeros(3, np.float32))
    second = store.publish(other, card)
    assert second.version == "2"
    assert (store.root / "tiny" / "1" / "model.onnx").read_bytes() == first
    assert second.onnx_sha256 != store.card("tiny@1").onnx_sha256


def test_publish_refuses_to_rename_onto_an_existing_directory(store, onnx_model, card, monkeypatch):
    store.publish(onnx_model, card)
    # Simulate a racing writer that bypassed the lock: version 2 appears after allocation.
    monkeypatch.setattr(ModelStore, "versions", lambda self, name: ["1"])
    (store.root / "tiny" / "2").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        store.publish(onnx_model, card)
    assert list((store.root / "tiny" / "2").iterdir()) == []
    assert not [p for p in (store.root / "tiny").iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_publishes_from_processes_get_distinct_versions(tmp_path, onnx_model, card):
    root = tmp_path / "store"
    card_path = tmp_path / "card.json"
    card_path.write_text(card.to_json())
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from cellinspect.models.card import ModelCard
        from cellinspect.models.store import ModelStore
        while not Path({str(go)!r}).exists():
            time.sleep(0.005)
        store = ModelStore({str(root)!r})
        card = ModelCard.load({str(card_path)!r})
        print(json.dumps([store.publish({str(onnx_model)!r}, card).version for _ in range(3)]))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(0.5)  # let every interpreter reach the start line
    go.touch()
    got: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        got += json.loads(out)
    assert sorted(got, key=int) == [str(v) for v in range(1, 13)]
    store = ModelStore(root)
    assert store.versions("tiny") == [str(v) for v in range(1, 13)]
    for version in store.versions("tiny"):
        store.load_verified(f"tiny@{version}")


def test_card_name_mismatch_leaves_nothing_behind(store, onnx_model, card):
    with pytest.raises(ValueError, match="does not match the store name"):
        store.publish(onnx_model, card, name="other")
    assert store.versions("tiny") == []
    assert not (store.root / "tiny").exists()


def test_failure_mid_publish_leaves_no_partial_version(store, onnx_model, card, monkeypatch):
    store.publish(onnx_model, card)

    def boom(self: ModelCard) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "to_json", boom)
    with pytest.raises(OSError, match="disk full"):
        store.publish(onnx_model, card)
    assert store.versions("tiny") == ["1"]
    assert _entries(store) == [".lock", "1"]
    monkeypatch.undo()
    assert store.publish(onnx_model, card).version == "2"


def test_publish_of_missing_onnx_file_raises(store, card, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        store.publish(tmp_path / "missing.onnx", card)


# ---- integrity --------------------------------------------------------------------------


def test_load_verified_returns_card_and_model_path(published):
    store = published(2)
    card, path = store.load_verified("tiny@1")
    assert (card.name, card.version) == ("tiny", "1")
    assert path == store.root / "tiny" / "1" / "model.onnx"


def test_tampered_model_is_refused_naming_the_file(published):
    store = published(1)
    model_file = store.root / "tiny" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(IntegrityError) as err:
        store.load_verified("tiny")
    message = str(err.value)
    assert "model.onnx of tiny@1 fails its sha256 check" in message
    assert "the file was modified or corrupted" in message
    assert str(model_file) in message


@pytest.mark.parametrize("missing", ["model.onnx", "card.json"])
def test_missing_file_is_an_integrity_error(published, missing):
    store = published(1)
    (store.root / "tiny" / "1" / missing).unlink()
    with pytest.raises(IntegrityError, match=missing):
        store.load_verified("tiny@1")


def test_card_of_another_version_is_an_integrity_error(published):
    store = published(2)
    one = store.root / "tiny" / "1" / "card.json"
    one.write_text((store.root / "tiny" / "2" / "card.json").read_text())
    with pytest.raises(IntegrityError, match="describes tiny@2, not tiny@1"):
        store.load_verified("tiny@1")


# ---- aliases ----------------------------------------------------------------------------


def test_promote_and_rollback_move_the_alias_and_log_each_move(published, monkeypatch):
    monkeypatch.setenv("CELLINSPECT_USER", "qa-anna")
    store = published(3)
    store.promote("tiny", 1)
    store.promote("tiny", "2")
    store.promote("tiny", 3)
    assert store.aliases("tiny") == {"production": "3"}
    move = store.rollback("tiny")
    assert (move.from_version, move.to_version, move.action) == ("3", "2", "rollback")
    assert store.resolve("tiny") == ("tiny", "2")
    store.rollback("tiny")  # repeated rollbacks walk further back, not back and forth
    assert store.aliases("tiny") == {"production": "1"}
    with pytest.raises(ModelNotFoundError, match="no earlier version"):
        store.rollback("tiny")

    lines = (store.root / "tiny" / ALIASES_LOG).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["action"], r["from"], r["to"]) for r in records] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("promote", "2", "3"),
        ("rollback", "3", "2"),
        ("rollback", "2", "1"),
    ]
    assert all(r["alias"] == "production" and r["user"] == "qa-anna" for r in records)
    assert all(r["time"] for r in records)


def test_rollback_without_history_is_an_error(published):
    store = published(1)
    with pytest.raises(ModelNotFoundError, match="no earlier version"):
        store.rollback("tiny")
    store.promote("tiny", 1)
    with pytest.raises(ModelNotFoundError, match="no earlier version"):
        store.rollback("tiny")


def test_aliases_are_independent_and_written_as_json(published):
    store = published(2)
    store.set_alias("tiny", "staging", 2)
    store.promote("tiny", 1)
    assert store.aliases("tiny") == {"staging": "2", "production": "1"}
    assert json.loads((store.root / "tiny" / "aliases.json").read_text()) == store.aliases("tiny")
    assert [m.alias for m in store.alias_history("tiny")] == ["staging", "production"]
    assert not [p for p in (store.root / "tiny").iterdir() if p.name.startswith(".tmp-")]


def test_promoting_the_current_version_logs_nothing(published):
    store = published(1)
    store.promote("tiny", 1)
    store.promote("tiny", 1)
    assert len(store.alias_history("tiny")) == 1


def test_alias_on_unknown_model_creates_nothing(published):
    store = published(1)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'tyni'.*models: tiny"):
        store.promote("tyni", 1)
    assert not (store.root / "tyni").exists()


def test_alias_to_unknown_version_lists_versions(published):
    store = published(2)
    with pytest.raises(ModelNotFoundError, match=r"no version 7 \(versions: 1, 2\)"):
        store.promote("tiny", 7)
    with pytest.raises(ValueError, match="positive integer"):
        store.set_alias("tiny", "staging", "latest")
    assert store.aliases("tiny") == {}


@pytest.mark.parametrize("alias", ["123", "../prod", "Prod", ""])
def test_bad_alias_names_are_refused(published, alias):
    store = published(1)
    with pytest.raises(ValueError, match="invalid alias"):
        store.set_alias("tiny", alias, 1)


# ---- resolution -------------------------------------------------------------------------


def test_resolve_rules(published):
    store = published(3)
    assert store.resolve("tiny") == ("tiny", "3")  # no production alias: latest
    store.promote("tiny", 2)
    assert store.resolve("tiny") == ("tiny", "2")  # production wins over latest
    assert store.resolve("tiny@1") == ("tiny", "1")
    assert store.resolve(ModelRef("tiny", "3")) == ("tiny", "3")
    assert store.resolve("tiny@production") == ("tiny", "2")
    store.set_alias("tiny", "staging", 3)
    assert store.resolve("tiny@staging") == ("tiny", "3")
    assert store.path("tiny@1") == store.root / "tiny" / "1"
    assert store.card("tiny@staging").version == "3"


def test_resolve_unknown_things_lists_what_exists(published):
    store = published(2)
    store.promote("tiny", 1)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'nope'.*models: tiny"):
        store.resolve("nope")
    with pytest.raises(ModelNotFoundError, match=r"no version 9 \(versions: 1, 2\)"):
        store.resolve("tiny@9")
    with pytest.raises(ModelNotFoundError, match=r"no alias 'canary' \(aliases: production=1\)"):
        store.resolve("tiny@canary")
    assert issubclass(ModelNotFoundError, LookupError)


def test_list_models_summarises_versions_and_aliases(store, onnx_model, tiny):
    assert store.list_models() == []
    store.publish(onnx_model, tiny.make_card("alpha"))
    store.publish(onnx_model, tiny.make_card("alpha"))
    store.publish(onnx_model, tiny.make_card("beta"))
    store.promote("alpha", 1)
    summaries = {s.name: s for s in store.list_models()}
    assert list(summaries) == ["alpha", "beta"]
    assert summaries["alpha"].versions == ["1", "2"]
    assert summaries["alpha"].aliases == {"production": "1"}
    assert summaries["alpha"].latest == "2"
    assert summaries["beta"].latest == "1"


def test_versions_sort_numerically(store, onnx_model, card):
    for _ in range(11):
        store.publish(onnx_model, card)
    assert store.versions("tiny")[-3:] == ["9", "10", "11"]
    assert store.resolve("tiny") == ("tiny", "11")


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiny", ModelRef("tiny")),
        ("tiny@3", ModelRef("tiny", "3")),
        ("tiny@007", ModelRef("tiny", "7")),
        ("tiny@production", ModelRef("tiny", "production")),
        ("cell-v2.1_b@staging", ModelRef("cell-v2.1_b", "staging")),
    ],
)
def test_parse_model_ref(text, expected):
    assert parse_model_ref(text) == expected
    assert str(parse_model_ref(str(expected))) == str(expected)


@pytest.mark.parametrize(
    "text",
    [
        "../x",
        "a/b",
        "x" * 200,
        "UPPER",
        "",
        ".hidden",
        "a b",
        "tiny@",
        "tiny@0",
        "tiny@a@b",
        "/etc",
    ],
)
def test_bad_refs_are_refused(text):
    with pytest.raises(ValueError, match="invalid"):
        parse_model_ref(text)


@pytest.mark.parametrize("name", ["../x", "a/b", "x" * 200, "UPPER"])
def test_bad_names_are_refused_by_every_entry_point(store, onnx_model, tiny, name):
    with pytest.raises(ValueError, match="invalid model name"):
        store.publish(onnx_model, tiny.make_card(name))
    with pytest.raises(ValueError, match="invalid model name"):
        store.resolve(name)
    with pytest.raises(ValueError, match="invalid model name"):
        store.promote(name, 1)
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_long_names_are_shortened_in_the_error():
    with pytest.raises(ValueError) as err:
        store_module.validate_name("x" * 5000)
    assert len(str(err.value)) < 300


def test_publish_writes_extra_files_in_the_same_version(store, onnx_model, card):
    published = store.publish(onnx_model, card, extra_files={"training_hashes.txt": b"x\n"})
    _, onnx_path = store.load_verified(f"{card.name}@{published.version}")
    assert (onnx_path.parent / "training_hashes.txt").read_bytes() == b"x\n"
    for bad in ("card.json", "../escape.txt", "sub/dir.txt"):
        with pytest.raises(ValueError, match="plain, new file name"):
            store.publish(onnx_model, card, extra_files={bad: b""})
    assert store.versions(card.name) == [published.version]
