"""An independent float64 AMS oracle in numpy, written from the Grams paper's Algorithm 1
and ``docs/maths.md``. It shares no code with ``sharded_ams`` (``update.py`` is the maths
the backends run; comparing a backend with it checks precision, comparing with this
checks meaning). It follows the paper's notation literally: bias-corrected m^ and v^,
u = m^ / (sqrt(v^) + eps), the masks phi and psi, and the scale eta d / (|phi|_1 + |psi|_1).

The project's conventions where the paper leaves a choice (docs/maths.md): a tie
(u s == 0) weighs max(lam, 0); the scale counts over each whole tensor and is eta when
|lam| == 1 or when the denominator is 0; decoupled decay uses the same scaled eta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class OracleTensor:
    p: np.ndarray
    m: np.ndarray
    v: np.ndarray
    s: Optional[np.ndarray]
    t: int = 0


@dataclass
class AMSOracle:
    """Float64 AMS over a list of tensors (any shapes); ``step`` takes one gradient each."""

    lr: float
    beta1: float
    beta2: float
    beta3: float
    lam: float
    eps: float
    weight_decay: float
    tensors: list[OracleTensor] = field(default_factory=list)

    @classmethod
    def start(cls, params: Sequence, *, lr: float, betas: Sequence[float], beta3: float,
              lam: float, eps: float, weight_decay: float) -> "AMSOracle":
        o = cls(float(lr), float(betas[0]), float(betas[1]), float(beta3), float(lam),
                float(eps), float(weight_decay))
        for p in params:
            p = np.array(_numpy(p), dtype=np.float64)
            z = np.zeros_like(p)
            o.tensors.append(OracleTensor(p, z.copy(), z.copy(), z.copy() if beta3 > 0 else None))
        return o

    def step(self, grads: Sequence, lr: Optional[float] = None) -> None:
        eta = self.lr if lr is None else float(lr)
        for st, g in zip(self.tensors, grads):
            g = np.array(_numpy(g), dtype=np.float64)
            st.t += 1
            st.m = self.beta1 * st.m + (1.0 - self.beta1) * g
            st.v = self.beta2 * st.v + (1.0 - self.beta2) * g * g
            if st.s is not None:
                st.s = self.beta3 * st.s + (1.0 - self.beta3) * g
                ref = st.s
            else:
                ref = g
            m_hat = st.m / (1.0 - self.beta1 ** st.t)
            v_hat = st.v / (1.0 - self.beta2 ** st.t)
            u = m_hat / (np.sqrt(v_hat) + self.eps)
            us = u * ref
            phi = (us >= 0).astype(np.float64)            # 1[u s >= 0]
            psi = self.lam * (us < 0).astype(np.float64)  # lam 1[u s < 0]
            w = np.where(us > 0, 1.0, np.where(us < 0, self.lam, max(self.lam, 0.0)))
            if abs(self.lam) == 1.0:
                eta_hat = eta
            else:
                denom = np.abs(phi).sum() + np.abs(psi).sum()
                eta_hat = eta * g.size / denom if denom > 0 else eta
            st.p = st.p * (1.0 - eta_hat * self.weight_decay) - eta_hat * w * u

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Tensor i's float64 state under the optimizer's state names, as torch tensors."""
        st = self.tensors[i]
        out = {"param": st.p, "exp_avg": st.m, "exp_avg_sq": st.v}
        if st.s is not None:
            out["exp_avg_s"] = st.s
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # only its values are read
        x = x.detach().cpu().double().numpy()
    return np.asarray(x)

