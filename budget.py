"""Training for a wall-clock budget (`--time_budget 90m`): how many steps fit, planned as the run goes.

A user thinks in hours of a machine, not in steps, and a schedule fixed in steps wastes what a
faster machine leaves over (or runs past the budget on a slower one). So the run plans its last
step from what it measures:

    steps left = (budget - used - validations left - checkpoints left - the end) / seconds per step

Time used counts from the process's start (imports, data, model and cache included), plus what
the parts of the run before a resume used (run_clock). Seconds per step are those of the recent
steps alone (validations and checkpoints taken out), so a machine that turns slower or faster
half-way (another job takes a core, then leaves) is followed within a few steps. A validation
costs what the last ones cost; before the first, it is guessed from its size: it encodes every
image and caption once, forward only, decoding the images anew, and on CPU four batches of items
cost about one training step, plus a second for the DataLoader's start. The end (TensorBoard's
projector, the results and curves) is reserved for too. The first plan is made after PLAN_AFTER
steps and a new one after every step (a few arithmetic operations).

A new plan moves only the end of the cosine decay, never the rate of the step the run is at:
train_step.WarmupCosine continues the decay from where it stands to the new last step.
"""
import collections
import math
import os
import time
from dataclasses import dataclass

PLAN_AFTER = 5          # steps measured before the first plan (the first one pays for warm caches)
RECENT_STEPS = 20       # the steps whose times are averaged
END_S = 2.0             # results, curves and the summary after the last validation and save
PROJECTOR_COST = 2.0    # TensorBoard's projector at the end: a validation of its pairs, twice over
                        # (it loads the images again and writes a thumbnail of each)
LOG_CHANGE = 0.02       # a new plan is logged when the last step moves by more than this share


def format_duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def process_age():
    """Seconds since this process started (Linux: its start time in /proc, so that the imports
    before main() count too; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - IMPORTED


IMPORTED = time.perf_counter()


def run_clock(started, count_imports):
    """The run's clock: seconds since `started` (time.perf_counter() when train.main() began), and,
    for a run from the command line (count_imports), the seconds its process had lived by then;
    train.main() called inside a longer-lived process (tests, benchmarks) counts from its start."""
    before = process_age() - (time.perf_counter() - started) if count_imports else 0.0
    return lambda: before + time.perf_counter() - started


@dataclass
class Plan:
    """One plan: at `step`, after `elapsed_s`, the run should end at `total_steps`."""
    step: int
    elapsed_s: float
    total_steps: int
    step_s: float             # seconds per training step, recent
    validations: int          # validations left, the final one included
    validation_s: float       # seconds per validation (measured, or guessed before the first)
    checkpoints: int          # last.pt writes left, the final one included
    checkpoint_s: float
    end_s: float              # after the last validation and checkpoint: projector, results, curves

    def describe(self, budget_s):
        end = self.elapsed_s + (self.total_steps - self.step) * self.step_s + \
            self.validations * self.validation_s + self.checkpoints * self.checkpoint_s + self.end_s
        return (f"time budget {format_duration(budget_s)}: {self.total_steps} steps planned at step "
                f"{self.step} ({self.step_s:.3f} s per step, {self.validations} validations of "
                f"{self.validation_s:.1f} s and {self.checkpoints} checkpoints of {self.checkpoint_s:.1f} s "
                f"left, {self.end_s:.0f} s for the end; {format_duration(self.elapsed_s)} used, ending at "
                f"about {format_duration(end)})")


class Budget:
    """The clock and the measurements a plan needs. `used_s` is what earlier parts of a resumed
    run used (TrainState.budget["used_s"]); val_items, the images and captions a validation
    encodes, and batch_size make the guess of its time before the first one is measured;
    projector_items are those the projector encodes at the end."""

    def __init__(self, budget_s, used_s, val_items, batch_size, projector_items, clock):
        self.clock = clock                      # seconds, monotonic: run_clock
        self.budget_s = budget_s
        self.used_before = used_s
        self.val_steps = val_items / (4 * batch_size)
        self.projector_share = PROJECTOR_COST * projector_items / max(1, val_items)
        self.step_times = collections.deque(maxlen=RECENT_STEPS)
        self.mark = None                # (step, pure loop seconds) at the last measure

    def elapsed(self):
        return self.used_before + self.clock()

    def measure(self, step, timing):
        """Time the steps since the last call, without the validations and checkpoints among them
        (timing: train.Timing, which sums those); returns whether a plan can be made."""
        pure = self.clock() - timing.validation_s - timing.checkpoint_s
        if self.mark is not None and step > self.mark[0]:
            self.step_times.extend([(pure - self.mark[1]) / (step - self.mark[0])] * (step - self.mark[0]))
        self.mark = (step, pure)
        return len(self.step_times) >= PLAN_AFTER

    def step_s(self):
        return sum(self.step_times) / len(self.step_times)

    def plan(self, step, timing, validations_left, checkpoints_left):
        """The last step that ends the run inside its budget. validations_left(total) and
        checkpoints_left(total) count what a run ending at `total` still has to do."""
        step_s = self.step_s()
        validation_s = timing.validation_s / timing.validations if timing.validations else \
            step_s * self.val_steps + 1.0
        end_s = END_S + self.projector_share * validation_s
        checkpoint_s = timing.checkpoint_s / timing.checkpoints if timing.checkpoints else 0.2
        elapsed = self.elapsed()
        left = self.budget_s - elapsed - end_s
        # The overheads depend on the end and the end on the overheads: from the end without them,
        # each round can only move it earlier, and it settles when the count of validations does.
        total = step + max(0, math.floor(left / step_s))
        for _ in range(8):
            overhead = validations_left(total) * validation_s + checkpoints_left(total) * checkpoint_s
            earlier = min(total, step + max(0, math.floor((left - overhead) / step_s)))
            if earlier == total:
                break
            total = earlier
        return Plan(step, elapsed, total, step_s, validations_left(total), validation_s,
                    checkpoints_left(total), checkpoint_s, end_s)


def validations_left(step, total, eval_every, steps_per_epoch):
    """Validations a run at `step` does before and at its end `total`: every eval_every steps, or
    at each epoch's end (eval_every 0), and one at the end."""
    every = eval_every or steps_per_epoch
    return max(0, (total - 1) // every - step // every) + 1


def checkpoints_left(step, total, save_every):
    return max(0, (total - 1) // save_every - step // save_every) + 1
