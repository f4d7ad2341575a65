"""A classic BPF interpreter for the steering programs of netboot/dhcp4/steering.py (tests only: the kernel runs
them in the appliance)."""
from __future__ import annotations

from netboot.dhcp4.steering import _JA, _JEQ, _JGE, _LD_H, _LD_LEN, _LD_W, _RET, Insn


def run_program(prog: list[Insn], data: bytes) -> int:
    """Interpret the program on a UDP payload as the kernel would (for tests); an out-of-bounds load returns 0."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == _LD_LEN:
            a = len(data)
        elif code in (_LD_W, _LD_H):
            size = 4 if code == _LD_W else 2
            if k + size > len(data):
                return 0
            a = int.from_bytes(data[k:k + size], "big")
        elif code == _RET:
            return k
        elif code == _JA:
            pc += k
        elif code in (_JEQ, _JGE):
            pc += jt if (a == k if code == _JEQ else a >= k) else jf
        else:
            raise ValueError(f"opcode {code:#x}")
        pc += 1
