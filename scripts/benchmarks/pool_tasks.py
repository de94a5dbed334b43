"""The pools section's pure-Python task, imported by its workers as a ``--tasks`` module."""

from worker import task


@task(name="bench.spin")
def spin(n: int) -> int:
    """Pure Python holding the GIL: ``n`` loop turns."""
    total = 0
    for i in range(n):
        total += i & 7
    return total
