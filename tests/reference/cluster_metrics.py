#!/usr/bin/env python3
"""Independent reference for tests/test_train.c's clustering-metric cases: the textbook definitions
(Vinh, Epps, Bailey 2010 for E[MI]; Hubert and Arabie 1985 for ARI), with exact binomial coefficients
(math.comb) instead of excb's log-gamma form. Arithmetic-mean normalisation, as scikit-learn's default.
Prints NMI, AMI, ARI, many-to-one accuracy for each case."""
import math
from collections import Counter
from fractions import Fraction

def scores(pred, truth):
    N = len(pred)
    nij = Counter(zip(pred, truth)); a = Counter(pred); b = Counter(truth)
    mi = sum(n / N * math.log(N * n / (a[i] * b[j])) for (i, j), n in nij.items())
    hu = -sum(x / N * math.log(x / N) for x in a.values())
    hv = -sum(x / N * math.log(x / N) for x in b.values())
    emi = 0.0
    for ai in a.values():
        for bj in b.values():
            for n in range(max(1, ai + bj - N), min(ai, bj) + 1):
                p = Fraction(math.comb(ai, n) * math.comb(N - ai, bj - n), math.comb(N, bj))   # hypergeometric
                emi += n / N * math.log(N * n / (ai * bj)) * float(p)
    mean_h = (hu + hv) / 2
    c2 = lambda x: x * (x - 1) // 2
    s_ij = sum(c2(n) for n in nij.values()); sa = sum(c2(x) for x in a.values()); sb = sum(c2(x) for x in b.values())
    expected = Fraction(sa * sb, c2(N)); mx = Fraction(sa + sb, 2)
    ari = (s_ij - expected) / (mx - expected)
    m2o = sum(max(n for (i, j), n in nij.items() if i == c) for c in a) / N
    return mi / mean_h, (mi - emi) / (mean_h - emi), float(ari), m2o

cases = {
    "D": ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]),
    "E": ([0, 0, 1, 1, 2, 2, 2, 3], [0, 0, 0, 1, 1, 2, 2, 2]),
}
for name, (p, t) in cases.items():
    print(name, " ".join("%.12f" % v for v in scores(p, t)))
