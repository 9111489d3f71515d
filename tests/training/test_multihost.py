"""Two local processes joined by ``jax.distributed.initialize`` (CPU, 2 devices each) train 3
steps, each feeding only its half of the global batch, and match one process with 4 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _makers import REPO, TESTS, free_port
from _train_helpers import max_rel_err

WORKER = os.path.join(TESTS, "_multihost_worker.py")


def _process_env(**kw):
    env = dict(os.environ, PYTHONPATH=REPO, **{k: str(v) for k, v in kw.items()})
    env.pop("XLA_FLAGS", None)
    return env


def _result(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
def test_two_processes_match_one():
    addr = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER],
            env=_process_env(NUM_PROCESSES=2, PROCESS_ID=i, COORDINATOR=addr),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    multi = _result(outs[0][0])
    single_proc = subprocess.run(
        [sys.executable, WORKER], env=_process_env(NUM_PROCESSES=1), capture_output=True, text=True, timeout=600
    )
    assert single_proc.returncode == 0, single_proc.stderr[-4000:]
    single = _result(single_proc.stdout)
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    assert sorted(multi["params"]) == sorted(single["params"])
    keys = sorted(single["params"])
    rel, key_bias_abs = max_rel_err(
        {k: np.asarray(multi["params"][k]) for k in keys}, {k: np.asarray(single["params"][k]) for k in keys}
    )
    assert rel <= 1e-5 and key_bias_abs <= 1e-3, (rel, key_bias_abs)  # key biases: see _train_helpers


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_the_same_step_via_the_sync_point():
    """SIGTERM to process 1 only: JAX's preemption sync point (no per-step all-gather) makes
    both processes stop at the same step."""
    import signal
    import time

    addr = f"127.0.0.1:{free_port()}"
    worker = os.path.join(TESTS, "_preemption_worker.py")
    env = [dict(_process_env(PROCESS_ID=i, COORDINATOR=addr), JAX_PLATFORMS="cpu") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, worker], env=env[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        assert procs[1].stdout.readline().strip() == "READY"
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stops = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        line = [l for l in out.splitlines() if l.startswith("STOP")]
        assert line and line[0].endswith("sync_point=True"), out
        stops.append(int(line[0].split()[1]))
    assert stops[0] == stops[1]
