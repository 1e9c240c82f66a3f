"""When to try a delivery again, and when to give up on it (dead letter).

Pure functions: the outbox stores the attempt count and next time; these only compute.
"""

from __future__ import annotations

import math
import random

from plugin.delivery.base import SendOutcome


def next_delay(
    attempt: int,
    base: float,
    factor: float,
    cap: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first failure):
    `base * factor**(attempt - 1)`, at most `cap`.

    `jitter` in [0, 1] spreads retries of many deliveries that failed together (a peer
    restart): the delay is drawn uniformly from `[d * (1 - jitter), d]`; 0 is exact, 1 is
    "full jitter". `rng` makes jittered delays reproducible in tests.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts failed tries from 1, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError(f"base and cap must be >= 0, got base={base}, cap={cap}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1 so delays never shrink, got {factor}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter is a fraction in [0, 1], got {jitter}")
    exponent = attempt - 1
    # Compare in log space: factor**exponent overflows a float long before attempts run out.
    if base == 0 or cap == 0:
        delay = 0.0
    elif exponent * math.log(factor) >= math.log(cap / base):
        delay = cap
    else:
        delay = base * factor**exponent
    if jitter:
        delay -= (rng or random).uniform(0.0, jitter * delay)
    return delay


def should_dead_letter(attempt: int, max_attempts: int, outcome: SendOutcome) -> bool:
    """True when a failed delivery must stop being retried: the failure is permanent, or
    `attempt` (counting this one) has used up `max_attempts`. A success is never a dead letter.
    """
    if attempt < 1 or max_attempts < 1:
        raise ValueError(f"attempt and max_attempts count from 1, got {attempt}, {max_attempts}")
    if outcome.ok:
        return False
    return not outcome.retryable or attempt >= max_attempts
