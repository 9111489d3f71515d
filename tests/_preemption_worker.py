"""One of two processes (tests/training/test_multihost.py): the train loop's preemption check on a 2-process
jax.distributed CPU cluster; the test SIGTERMs process 1 only, and both must stop at one step."""

import os
import sys
import time

import jax

jax.distributed.initialize(
    coordinator_address=os.environ["COORDINATOR"], num_processes=2, process_id=int(os.environ["PROCESS_ID"])
)
from chinese_clip_jax.training.loop import _Preemption  # noqa: E402

preempt = _Preemption()
print("READY", flush=True)
for step in range(1, 2000):
    time.sleep(0.02)
    if preempt.should_stop(step):
        print(f"STOP {step} sync_point={preempt._sync_point}", flush=True)
        sys.exit(0)
print("NEVER", flush=True)
sys.exit(1)
