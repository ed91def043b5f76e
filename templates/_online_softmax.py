"""The online-softmax step of the forward attention templates (selection, window), one T.macro.

`online_softmax(M, N, Dv, sc)` returns a macro that folds one K/V block's logits acc_s [M, N]
(already masked: logits a row must not see are -inf, replaced, never added to) into the running
row max m, row sum l and output acc_o [M, Dv] (rescaled by alpha), and leaves the block's
probabilities in p (the MMA dtype) for the P @ V product. m, m_prev, alpha, ms, rsum, l are [M]
float32 fragments; sc is the softmax scale (natural exp).

The -inf guard: a row stays at m = -inf until its first usable block (the window's first tiles
before it, a selection row's pads); its exponentials are taken against 0 then, so no
(-inf) - (-inf) = NaN appears. T.__exp is __expf (ex2.approx), fast even without fast-math.

The compression forward keeps its own step (exp2 on pre-scaled logits, reduce_max with clear=False):
sharing this one would change its generated code, which only a GPU run can clear.
Codegen fingerprints hash this file with the templates that import it.
"""

import tilelang.language as T


def online_softmax(M: int, N: int, Dv: int, sc: float):
    ninf = -T.infinity("float32")

    @T.macro
    def step(acc_s, m, m_prev, alpha, ms, rsum, l, p, acc_o):
        T.copy(m, m_prev)
        T.reduce_max(acc_s, m, dim=1, clear=True)
        for i in T.Parallel(M):
            m[i] = T.max(m[i], m_prev[i])
        for i in T.Parallel(M):
            ms[i] = T.if_then_else(m[i] == ninf, 0, m[i] * sc)
            alpha[i] = T.__exp(m_prev[i] * sc - ms[i])
        for i, c in T.Parallel(M, N):
            acc_s[i, c] = T.__exp(acc_s[i, c] * sc - ms[i])
        T.reduce_sum(acc_s, rsum, dim=1)
        for i in T.Parallel(M):
            l[i] = l[i] * alpha[i] + rsum[i]
        T.copy(acc_s, p)
        for i, d in T.Parallel(M, Dv):
            acc_o[i, d] *= alpha[i]
    return step
