"""io.atomic_output / atomic_write: temporaries of an interrupted earlier write are removed when provably
left over (their process gone, untouched for a minute), and only those."""

import os
import subprocess


def test_atomic_write_removes_the_temporaries_of_an_interrupted_earlier_write(tmp_path, caplog):
    from chinese_clip_jax import io as ccj_io

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended: what a killed writer leaves behind in the name
    old, fresh, alive = (tmp_path / f"r.json.tmp{gone.pid}"), tmp_path / "r.json.tmp999999999", tmp_path / "r.json.tmp1"
    for p in (old, fresh, alive):
        p.write_text("{")
    os.utime(old, (0, 0))
    os.utime(alive, (0, 0))  # pid 1 runs: never taken for a leftover
    other = tmp_path / f"s.json.tmp{gone.pid}"
    other.write_text("{")
    os.utime(other, (0, 0))
    with caplog.at_level("WARNING"):
        ccj_io.atomic_write(tmp_path / "r.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", fresh.name, alive.name, other.name])
    assert f"removed {old}: left by an earlier write of {tmp_path / 'r.json'} that was interrupted" in caplog.text
