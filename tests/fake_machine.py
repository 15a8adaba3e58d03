"""A machine on a fake clock, for time-budget tests: `budget.clock` reads seconds that pass only when the run
works, `step_s(step)` for each training step (the budget's throw-away steps included) and `eval_s` for each
evaluation, so a budgeted run's plan follows the speeds a test gives, never this machine's.

`python -m tests.fake_machine STEP_S SLOWER_RANK FLAGS...` (under torchrun): the sakimi-next command line on
such a machine, each step taking STEP_S seconds, SLOWER_RANK's twice as long (the test hook lives here,
not in the library)."""

import os
import sys
from collections.abc import Callable

from sakimi_next import budget, train
from sakimi_next.batches import WindowSampler
from sakimi_next.cli import main


class FakeMachine:
    def __init__(self, step_s: Callable[[int], float], eval_s: float = 0.0):
        self.now, self.step_s, self.eval_s = 0.0, step_s, eval_s

    def install(self, setattr: Callable = setattr) -> "FakeMachine":
        """Patch the clock, the sampler and the evaluation (`setattr`: pytest's monkeypatch.setattr, to undo it)."""
        batch, validate = WindowSampler.batch, train.validate

        def timed_batch(sampler, step, micro):
            if micro == 0:
                self.now += self.step_s(step)
            return batch(sampler, step, micro)

        def timed_validate(*args, **kwargs):
            self.now += self.eval_s
            return validate(*args, **kwargs)

        setattr(budget, "clock", lambda: self.now)
        setattr(WindowSampler, "batch", timed_batch)
        setattr(train, "validate", timed_validate)
        return self


if __name__ == "__main__":
    seconds, slower = float(sys.argv[1]), int(sys.argv[2])
    factor = 2.0 if int(os.environ.get("RANK", "0")) == slower else 1.0
    FakeMachine(lambda step: seconds * factor, eval_s=seconds).install()
    sys.exit(main(sys.argv[3:]))
