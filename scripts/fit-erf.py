#!/usr/bin/env python3
"""The float coefficients of GELU's erf in src/models/geglu_rows.inc, fitted again.

  python3 scripts/fit-erf.py        # needs mpmath (Debian: python3-mpmath); about 2 minutes

Two ranges of z = x / sqrt(2):
  |z| <= 1: erf(z) = z P(z^2), P of degree 6, minimising the absolute error;
  |z| >= 1: erfc(|z|) = t Q(t) exp(-z^2), t = 1 / (1 + |z|/2), Q of degree 8, minimising the
            relative error (what the negative tail of GELU needs).
Each fit is a discrete minimax by Lawson's iteration (weighted least squares, the weights
moved toward the largest errors). Rounding a fitted coefficient to float costs more than the
fit's own error (5.5e-8 for P's leading one), so the coefficients are fixed one at a time,
lowest order first: round one, fit the rest again around it. Prints both lists highest
order first, as the kernel's Horner evaluation takes them, and their errors with the float
coefficients in exact arithmetic.
"""
import struct

import mpmath as mp

mp.mp.dps = 30


def to_float(x):
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def lawson(target, basis, points, iterations=60):
    """Coefficients c minimising max |target - sum c_i basis_i| over points, and that maximum."""
    n = len(basis)
    rows = [[b(x) for b in basis] for x in points]
    values = [target(x) for x in points]
    weights = [mp.mpf(1) / len(points)] * len(points)
    for _ in range(iterations):
        normal, rhs = mp.matrix(n, n), mp.matrix(n, 1)
        for w, row, v in zip(weights, rows, values):
            for i in range(n):
                rhs[i] += w * row[i] * v
                for j in range(n):
                    normal[i, j] += w * row[i] * row[j]
        c = mp.lu_solve(normal, rhs)
        errors = [abs(v - sum(c[i] * row[i] for i in range(n))) for row, v in zip(rows, values)]
        total = sum(w * e for w, e in zip(weights, errors))
        weights = [w * e / total for w, e in zip(weights, errors)]
    return [c[i] for i in range(n)], max(errors)


def fit_in_floats(target, basis, points):
    fixed = []
    for k in range(len(basis)):
        def rest(x):
            return target(x) - sum(c * b(x) for c, b in zip(fixed, basis))
        c, _ = lawson(rest, basis[k:], points)
        fixed.append(to_float(c[0]))
    return fixed


def main():
    # |z| <= 1: erf(z) ~ sum_i P_i z^(2i+1)
    zs = [mp.mpf(i) / 300 for i in range(1, 301)]
    p = fit_in_floats(mp.erf, [lambda z, i=i: z ** (2 * i + 1) for i in range(7)], zs)
    # |z| >= 1: 1 ~ sum_i Q_i t^(i+1) exp(-z^2) / erfc(z), i.e. the relative error of erfc
    def t_of(a):
        return 1 / (1 + a / 2)
    zs = [1 + mp.mpf(i) / 40 for i in range(341)]  # 1 .. 9.5; beyond, exp(-z^2) is below float's range
    q = fit_in_floats(lambda a: mp.mpf(1),
                      [lambda a, i=i: t_of(a) ** (i + 1) * mp.exp(-a * a) / mp.erfc(a) for i in range(9)], zs)
    print("P (|z| <= 1), highest first:", ", ".join("%.9gf" % c for c in reversed(p)))
    print("Q (|z| >= 1), highest first:", ", ".join("%.9gf" % c for c in reversed(q)))
    near = max(abs(z * sum(c * z ** (2 * i) for i, c in enumerate(p)) - mp.erf(z)) for z in mp.linspace(0, 1, 3001))
    far = max(abs(sum(c * t_of(a) ** (i + 1) for i, c in enumerate(q)) * mp.exp(-a * a) / mp.erfc(a) - 1)
              for a in mp.linspace(1, 9.5, 3001))
    print("absolute error of erf on |z| <= 1: %s; relative error of erfc on |z| >= 1: %s" %
          (mp.nstr(near, 3), mp.nstr(far, 3)))


if __name__ == "__main__":
    main()
