"""Integer helpers for the launchers' host side (grids, tile edges).

`triton.cdiv` and `triton.next_power_of_2` are ConstexprFunctions in Triton 3.6: each call
goes through a wrapper that unwraps constexpr arguments, about as much Python as the
arithmetic's own launch share. Launchers call these on every launch (7k calls a 130m training
step, ~10% of the CPU time that enqueues it: `bench/bench_train.py --cpu-profile`), so they use
these plain-int versions instead.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 for n >= 1 (1 for n <= 0,
    where Triton's gives 0: no launcher asks for it)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
