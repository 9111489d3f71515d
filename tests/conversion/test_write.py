"""Conversion outputs: an earlier interrupted run is named with a way out (--clean-leftovers), and an
OUT that is a file is named as a file."""

import os

from _makers import run_module, script_env


def test_interrupted_conversion_is_named_and_cleaned_on_request(small_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.tmp").write_bytes(b"\0" * 100)  # what a killed conversion leaves
    res = run_module("convert", small_hf_dir, out, "--to", "hf", "--skip-parity", env=script_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {out / 'model.safetensors.tmp'}: an earlier run writing into {out} was interrupted (killed before "
        "it finished) and left model.safetensors.tmp unfinished; nothing there is complete: rerun with "
        "--clean-leftovers to delete them and write again, or delete them yourself"
    ]
    assert os.listdir(out) == ["model.safetensors.tmp"]
    res = run_module("convert", small_hf_dir, out, "--to", "hf", "--skip-parity", "--clean-leftovers", env=script_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"removed model.safetensors.tmp: left in {out} by an interrupted run" in res.stderr
    assert "model.safetensors" in os.listdir(out) and "model.safetensors.tmp" not in os.listdir(out)


def test_interrupted_flax_conversion_leftovers_and_finished_outputs(small_hf_dir, tmp_path):
    out = tmp_path / "out"
    (out / "params.orbax-checkpoint-tmp-1712").mkdir(parents=True)  # Orbax's, from a killed --to flax
    res = run_module("convert", small_hf_dir, out, env=script_env())
    assert res.returncode == 2 and "was interrupted" in res.stderr and "params.orbax-checkpoint-tmp-1712" in res.stderr
    (out / "config.json").write_text("{}")  # a finished output beside it: never overwritten, even when asked
    res = run_module("convert", small_hf_dir, out, "--clean-leftovers", env=script_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {out / 'config.json'} already exists; convert never overwrites: choose a new or empty output directory"
    ]
    assert sorted(os.listdir(out)) == ["config.json", "params.orbax-checkpoint-tmp-1712"]


def test_convert_into_a_file_is_named_as_a_file(small_hf_dir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    res = run_module("convert", small_hf_dir, target, env=script_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: OUT {target}: is a file, not a directory; choose a new or empty directory"
    ]
    assert target.read_text() == "mine\n"


def test_a_gs_out_is_staged_and_written_only_when_the_conversion_succeeds(
    small_hf_dir, tmp_path, fake_gcs, capsys, monkeypatch
):
    """OUT gs://... goes through io.staged_output (in-process: the fake gs:// lives in this
    process): the files are those of the same conversion into a local OUT; a conversion that
    fails after writing its weights copies nothing."""
    from chinese_clip_jax.conversion import cli
    from chinese_clip_jax.conversion.cli import main
    from chinese_clip_jax.io import as_path

    local = tmp_path / "local"
    assert main([str(small_hf_dir), str(local), "--to", "hf", "--skip-parity"]) == 0
    assert main([str(small_hf_dir), "gs://bucket/conv", "--to", "hf", "--skip-parity"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert as_path(f"gs://bucket/conv/{name}").read_bytes() == (local / name).read_bytes(), name
    assert sorted(p.name for p in as_path("gs://bucket/conv").iterdir()) == sorted(os.listdir(local))
    capsys.readouterr()
    written = []

    def card_fails(args, out, *rest):  # the weights are in the staged OUT; then the card fails
        written.extend(sorted(os.listdir(out)))
        raise OSError("No space left on device")

    monkeypatch.setattr(cli, "_write_card", card_fails)
    assert main([str(small_hf_dir), "gs://bucket/failed", "--to", "hf", "--skip-parity"]) == 2
    assert capsys.readouterr().err.strip() == "error: No space left on device"
    assert "model.safetensors" in written and not [k for k in fake_gcs.store if k.startswith("bucket/failed")]
