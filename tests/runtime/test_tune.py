"""`attnx tune`: a ranking measured on this CPU, kept in the per-user cache (never in the
bundle), used by the Runner on this CPU kind only; tampered or stale entries are ignored with
a warning."""

from __future__ import annotations

import json
import logging
import re

import pytest

from runtime import Runner, load_bundle
from runtime import _tune as tune_mod
from runtime._cli import main
from runtime._cpu import cpu_features
from runtime._runner import export_timing_point
from runtime._tune import Ranking, entry_path, load_rankings, nearest, store

CPU = "CPUExecutionProvider"
# Another CPU kind than this machine's, whatever this one is: an AVX2-only machine, or, where
# this is one, an AVX-512 machine with VNNI.
AVX2_ONLY = ("avx", "avx2", "fma", "f16c")
OTHER_CPU = AVX2_ONLY if cpu_features() != AVX2_ONLY else (*AVX2_ONLY, "avx512f", "avx512_vnni")


def _store_alt_first(folder, shape=None):
    """A tuned ranking that reverses the exporter's (base 1.0 ms, alt 2.0 ms)."""
    return store(load_bundle(folder), Ranking(shape or {"batch": 2, "seq": 5},
                                              {"alt": 0.5, "base": 3.0}))


def test_the_runner_takes_the_tuned_ranking_and_says_so(tiny_bundle):
    with Runner(tiny_bundle, provider="cpu") as runner:
        assert runner.variant.name == "base"
        assert runner.ranked_by == "the exporter's timings"
    path = _store_alt_first(tiny_bundle)
    with Runner(tiny_bundle, provider="cpu") as runner:
        assert runner.variant.name == "alt"
        assert runner.ranked_by.startswith("attnx tune on this CPU at batch=2, seq=5")
        assert str(path) in runner.ranked_by
    with Runner(tiny_bundle, provider="cpu", variant="base") as runner:
        assert runner.variant.name == "base" and runner.ranked_by == "named by the caller"


def test_the_bundle_is_left_as_it_was(tiny_bundle):
    before = {p.name: p.read_bytes() for p in tiny_bundle.iterdir()}
    path = _store_alt_first(tiny_bundle)
    assert {p.name: p.read_bytes() for p in tiny_bundle.iterdir()} == before
    assert not path.is_relative_to(tiny_bundle)
    load_bundle(tiny_bundle)  # every hash still holds


def test_a_ranking_for_another_cpu_kind_is_not_used(tiny_bundle, monkeypatch):
    _store_alt_first(tiny_bundle)
    monkeypatch.setattr(tune_mod, "cpu_features", lambda: OTHER_CPU)
    with Runner(tiny_bundle, provider="cpu") as runner:
        assert runner.variant.name == "base"
        assert runner.ranked_by == "the exporter's timings"


def test_an_entry_copied_to_another_cpu_is_stale(tiny_bundle, monkeypatch, caplog):
    path = _store_alt_first(tiny_bundle)
    monkeypatch.setattr(tune_mod, "cpu_features", lambda: OTHER_CPU)
    other = entry_path(tiny_bundle)
    other.write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, "attnx.runtime"):
        with Runner(tiny_bundle, provider="cpu") as runner:
            assert runner.variant.name == "base"
    assert f"tune cache entry {other} ignored: made for cpu" in caplog.text


def _rewrite(path, change, fix_checksum=True):
    entry = json.loads(path.read_text())
    change(entry["body"])
    if fix_checksum:
        entry["checksum"] = tune_mod._checksum(entry["body"])
    path.write_text(json.dumps(entry))


def _set(key, value):
    return lambda body: body.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "fix", "message"),
    [
        (lambda b: b["rankings"][0]["median_ms"].update(base=0.1), False,
         r"its checksum does not match its content \(edited or corrupted\)"),
        (_set("onnxruntime", "0.0.1"), True, r"made for onnxruntime '0\.0\.1', this is"),
        (_set("bundle", "0" * 64), True, r"made for bundle '0000"),
        (_set("version", 99), True, r"made for version 99, this is 1"),
        (lambda b: b["rankings"][0]["median_ms"].update(ghost=0.1), True,
         r"it ranks variants \['ghost'\] that this bundle does not offer here"),
        (_set("rankings", []), True, r"it holds no ranking"),
        (_set("rankings", [{"shape": 3}]), True, r"malformed rankings \(TypeError"),
    ],
    ids=["tampered", "onnxruntime", "bundle", "version", "unknown-variant", "empty", "malformed"],
)
def test_tampered_or_stale_entries_are_ignored_with_a_warning(tiny_bundle, caplog, change, fix,
                                                               message):
    path = _store_alt_first(tiny_bundle)
    _rewrite(path, change, fix)
    with caplog.at_level(logging.WARNING, "attnx.runtime"):
        with Runner(tiny_bundle, provider="cpu") as runner:
            assert runner.variant.name == "base"
    assert "attnx: tune cache entry" in caplog.text
    assert re.search(message, caplog.text)
    assert f"run `attnx tune {tiny_bundle}` again" in caplog.text


def test_an_unreadable_entry_is_ignored(tiny_bundle, caplog):
    path = _store_alt_first(tiny_bundle)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, "attnx.runtime"):
        rankings, _ = load_rankings(load_bundle(tiny_bundle), ["base", "alt"])
    assert rankings == [] and "ignored: unreadable (JSONDecodeError" in caplog.text


def test_the_ranking_at_the_nearest_shape_chooses(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    store(bundle, Ranking({"batch": 1, "seq": 2}, {"alt": 0.5, "base": 3.0}))
    store(bundle, Ranking({"batch": 1, "seq": 16}, {"base": 0.5, "alt": 3.0}))
    rankings, _ = load_rankings(bundle, ["base", "alt"])
    assert [dict(r.shape) for r in rankings] == [{"batch": 1, "seq": 2}, {"batch": 1, "seq": 16}]
    with Runner(tiny_bundle, provider="cpu", shape={"seq": 12}) as runner:
        assert runner.variant.name == "base"
    with Runner(tiny_bundle, provider="cpu", shape={"seq": 3}) as runner:
        assert runner.variant.name == "alt"
    store(bundle, Ranking({"batch": 1, "seq": 2}, {"base": 0.1, "alt": 3.0}))  # replaces
    assert len(load_rankings(bundle, ["base", "alt"])[0]) == 2
    assert nearest([r.shape for r in rankings], None) == 0


def test_the_exporters_timing_point_nearest_the_shape(kit, tmp_path):
    folder = kit.make_bundle(tmp_path / "b")
    raw = kit.read_manifest(folder)
    short, long = {"batch": 4, "seq": 4}, {"batch": 1, "seq": 16}
    raw["extra"]["variants"] = {
        "base": {"median_ms": {CPU: 1.0}, "timings": [
            {"point": short, "median_ms": {CPU: 1.0}}, {"point": long, "median_ms": {CPU: 9.0}}]},
        "alt": {"median_ms": {CPU: 2.0}, "timings": [
            {"point": short, "median_ms": {CPU: 2.0}}, {"point": long, "median_ms": {CPU: 3.0}}]},
    }
    kit.write_manifest(folder, raw)
    manifest = load_bundle(folder).manifest
    assert export_timing_point(manifest, {"seq": 14}) == long
    with Runner(folder, provider="cpu") as runner:
        assert runner.variant.name == "base"
        assert runner.ranked_by == "the exporter's timings at batch=4, seq=4"
    with Runner(folder, provider="cpu", shape={"seq": 16}) as runner:
        assert runner.variant.name == "alt"


def test_tune_cli_times_stores_and_the_runner_follows(tiny_bundle, capsys):
    assert main(["tune", str(tiny_bundle), "--shape", "seq=9", "--iters", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiny at batch=2, seq=9: ") and "fastest" in out[0]
    assert out[1] == f"  stored in {entry_path(tiny_bundle)}"
    fastest = out[0].rsplit("fastest ", 1)[1]
    with Runner(tiny_bundle, provider="cpu") as runner:
        assert runner.variant.name == fastest and "attnx tune" in runner.ranked_by
    assert main(["tune", str(tiny_bundle), "--json", "--iters", "2"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert sorted(result["ranking"]) == ["alt", "base"] and result["shape"]["seq"] == 5


def test_tune_cli_refuses_zero_iters(tiny_bundle, capsys):
    assert main(["tune", str(tiny_bundle), "--iters", "0"]) == 2
    assert "--iters must be >= 1, got 0" in capsys.readouterr().err
