"""The CPU kind of a bundle: recorded features, and one line when a lossy variant runs on a CPU
of another kind than the one that measured it (the CPU here is stood in for, so the test
holds on AVX2 and AVX-512 machines alike)."""

from __future__ import annotations

import logging

import pytest

from runtime import Manifest, Runner
from runtime._cli import main
from runtime._cpu import KERNEL_FEATURES, cpu_features

ZEN4 = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
ZEN3 = ("avx", "avx2", "fma", "f16c")


def test_features_come_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse2 avx2 fma avx f16c bmi2 sha_ni\n"
        "processor\t: 1\nflags\t\t: fpu avx512f\n"
    )
    assert cpu_features(cpuinfo) == ("avx", "avx2", "fma", "f16c")
    assert cpu_features(tmp_path / "missing") == ()
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_features(tmp_path / "arm") == ()


def test_only_kernel_features_are_listed_in_their_order():
    assert set(cpu_features()) <= set(KERNEL_FEATURES)
    assert list(cpu_features()) == [f for f in KERNEL_FEATURES if f in cpu_features()]


@pytest.fixture
def lossy_bundle(kit, tiny_bundle):
    """The tiny bundle with its `alt` variant marked lossy and measured on a Zen 4."""
    d = kit.read_manifest(tiny_bundle)
    d["extra"]["variants"]["alt"]["lossy"] = True
    d["machine"] = {"arch": "x86_64", "cpu_features": ZEN4}
    kit.write_manifest(tiny_bundle, d)
    return tiny_bundle


def test_the_runner_says_when_a_lossy_variant_runs_on_another_cpu_kind(
    lossy_bundle, monkeypatch, caplog
):
    monkeypatch.setattr("runtime._runner.cpu_features", lambda: ZEN3)
    with caplog.at_level(logging.WARNING, logger="attnx.runtime"):
        Runner(lossy_bundle, provider="cpu", variant="alt").close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("attnx: variant 'alt' of 'tiny' is lossy and its parity was measured")
    assert "on a CPU with " + " ".join(ZEN4) in line
    assert "this CPU has avx avx2 fma f16c" in line and f"attnx verify {lossy_bundle}" in line


def test_no_line_on_the_same_cpu_kind_or_for_an_exact_variant(lossy_bundle, monkeypatch, caplog):
    monkeypatch.setattr("runtime._runner.cpu_features", lambda: tuple(ZEN4))
    with caplog.at_level(logging.WARNING, logger="attnx.runtime"):
        Runner(lossy_bundle, provider="cpu", variant="alt").close()
        monkeypatch.setattr("runtime._runner.cpu_features", lambda: ZEN3)
        Runner(lossy_bundle, provider="cpu", variant="base").close()
    assert caplog.records == []


def test_a_bundle_without_a_recorded_machine_says_so(kit, tiny_bundle, monkeypatch, caplog):
    d = kit.read_manifest(tiny_bundle)
    d["extra"]["variants"]["alt"]["lossy"] = True
    kit.write_manifest(tiny_bundle, d)
    with caplog.at_level(logging.WARNING, logger="attnx.runtime"):
        Runner(tiny_bundle, provider="cpu", variant="alt").close()
    assert "measured on an unrecorded CPU" in caplog.records[0].getMessage()


def test_verify_notes_the_other_cpu_kind_and_rechecks_there(lossy_bundle, monkeypatch, capsys):
    monkeypatch.setattr("runtime._runner.cpu_features", lambda: ZEN3)
    assert main(["verify", str(lossy_bundle), "--provider", "cpu"]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "variant 'alt' of 'tiny' is lossy" in notes[0]
    assert notes[0].endswith("re-checked here against the golden outputs")
    assert "alt" in out and out.strip().splitlines()[-1] == "PASSED"


def test_the_machine_round_trips_and_is_checked(kit, lossy_bundle):
    from runtime._errors import ArtifactError

    manifest = Manifest.loads((lossy_bundle / "manifest.json").read_text())
    assert manifest.machine.cpu_features == tuple(ZEN4)
    assert Manifest.loads(manifest.to_json()) == manifest
    d = kit.read_manifest(lossy_bundle)
    d["machine"]["cpu_features"] = ["avx2", 3]
    with pytest.raises(ArtifactError, match=r"machine\.cpu_features\[1\]: expected a non-empty"):
        Manifest.from_dict(d)
