"""capsfast/progress.py: the Clock behind the trainer's images/s (summary.json, the last line)."""

from __future__ import annotations

import time

from capsfast.progress import Clock


def test_the_clock_counts_the_steps_between_warm_up_and_the_end_of_the_loop():
    """Warm-up, in-loop evaluation (`paused`) and the end of the run (after `stop`) are left out:
    4 steps of 10 images in 0.2 s of stepping is 200 img/s, however long the rest takes."""
    clock = Clock(step=0, warmup=1)
    time.sleep(0.1)
    clock.tick(1)  # warm-up over: the clock starts here
    assert clock.images_per_second(1, batch=10) is None  # no steady-state step yet
    time.sleep(0.1)
    clock.tick(3)
    with clock.paused():  # an epoch-end validation
        time.sleep(0.2)
    time.sleep(0.1)
    clock.tick(5)
    clock.stop()  # the loop has ended
    time.sleep(0.3)  # final checkpoint, validation, test, export
    clock.stop()  # a second stop keeps the first end
    rate = clock.images_per_second(5, batch=10)
    # Sleeps only overshoot: at most 200. Counting the end of the run would give 80, counting
    # the paused evaluation 100; a busy machine's overshoot stays well above those.
    assert 120 < rate <= 201, rate
    assert clock.images_per_second(5, batch=10) == rate  # it stands still after stop
