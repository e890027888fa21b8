"""Multistep solvers in lambda = log(alpha / sigma): DPM-Solver++ (2M, 3M, 2M SDE) and UniPC.

References:
- DPM-Solver++ (Lu et al. 2022), Algorithm 2 (2M, data prediction) and its third-order
  multistep update (3M); the SDE variant, eq. 9 of the same paper's appendix as diffusers'
  `sde-dpmsolver++` writes it (first order, and the midpoint second order).
- UniPC (Zhao et al. 2023), Algorithms 2 and 3: the predictor UniP-p and the corrector UniC-p
  with B(h) = e^h - 1 ("bh2"), data prediction; order 2 uses rho = 1/2 (the paper's simplified
  UniP-2), as the authors' code.

Symbols: alpha, sigma, lambda as in sampler_utils; h = lambda_next - lambda_now; D0 the current
x_0 prediction, r_k = h_k / h the previous steps' lambda increments relative to h; x: (B, *S).
Every solver starts at first order and raises its order by one per step; the last step is a
first-order jump to clean data (lambda = +inf), where every formula gives x_0 exactly. With fewer
than 15 steps, DPM-Solver++ also lowers its order on the second-to-last step (diffusers'
`lower_order_final`); UniPC's order is at most the number of steps left. A point at zero SNR
(lambda = -inf, t = T-1 with zero terminal SNR) is never part of a divided difference: the step
from it is first order (h = +inf: x_next = sigma_next x_t + alpha_next x_0, DDIM's step, as
x_t = eps there), and the orders after it grow from there.
"""

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch

from ddpmkit.diffusion.sampler_utils import predict, sampler_points, vp_alpha_sigma, vp_lambda

# DPM-Solver++ lowers its order near the end below this many steps (diffusers' default rule:
# high orders are unstable over the large last steps of short runs).
LOWER_ORDER_FINAL_BELOW = 15


@dataclass
class _History:
    """The previous steps' x_0 predictions and lambdas (most recent last), the step's x."""
    x_0: List[torch.Tensor] = field(default_factory=list)
    lam: List[float] = field(default_factory=list)
    x_prev: Optional[torch.Tensor] = None  # UniPC: the sample its last predictor started from
    order_prev: int = 0                    # UniPC: the order of that predictor

    def push(self, x_0: torch.Tensor, lam: float, keep: int) -> None:
        self.x_0 = (self.x_0 + [x_0])[-keep:]
        self.lam = (self.lam + [lam])[-keep:]

    def finite(self) -> int:
        """How many of the latest points have a finite lambda (zero SNR is -inf, and only ever
        the first point)."""
        return sum(1 for lam in self.lam if lam > -math.inf)


def _check_steps_for_order(name: str, steps: int, order: int) -> None:
    if steps < order:
        raise ValueError(f"{name} of order {order} needs at least {order} steps, got {steps}; "
                         f"ask for more steps or a lower order")


@dataclass
class DPMSolverPPSampler:
    """DPM-Solver++ of order 2 (2M) or 3 (3M), or the 2M SDE (`sde`, noise on every step but
    the last): S network evaluations at `solver_points`, then a first-order step to clean data."""
    T: int
    steps: int
    skip_schedule: str = "quadratic"
    order: int = 2
    sde: bool = False
    alphas_bar: Optional[np.ndarray] = field(default=None, repr=False)  # for karras spacing
    points: Optional[np.ndarray] = None  # explicit timesteps (descending), instead of spacing
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.order not in (2, 3) or (self.sde and self.order != 2):
            raise ValueError(f"DPM-Solver++ has orders 2 and 3 (the SDE order 2), got {self.order}")
        if self.points is None and self.order > 2:
            _check_steps_for_order("DPM-Solver++", self.steps, self.order)
        self.timesteps = sampler_points(self.points, self.T, self.steps, self.skip_schedule,
                                        self.alphas_bar)
        self.steps = len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return self.sde and i + 1 < len(self.timesteps)

    def new_state(self) -> Any:
        return _History()

    def _order_at(self, i: int, history: _History) -> int:
        # warm-up: first order, then up; a zero-SNR point takes part in no difference
        order = min(self.order, history.finite() + 1)
        if i == len(self.timesteps) - 2 and len(self.timesteps) < LOWER_ORDER_FINAL_BELOW:
            order = min(order, 2)
        return order

    def step(self, diffusion, model_output, x_t, i, noise, clip, state: _History):
        t_now = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        x_0 = predict(diffusion, model_output, x_t, t_now, clip).x_0
        if t_next < 0:
            return x_0, x_0  # lambda = +inf: the first-order step lands exactly on x_0
        (_, s_now), (a_next, s_next) = (vp_alpha_sigma(diffusion, t) for t in (t_now, t_next))
        lam_now, lam_next = vp_lambda(diffusion, t_now), vp_lambda(diffusion, t_next)
        h = lam_next - lam_now
        order = self._order_at(i, state)
        if self.sde:
            x = self._sde_update(x_t, x_0, state, order, h, lam_now, s_now, a_next, s_next,
                                 noise)
        else:
            x = self._ode_update(x_t, x_0, state, order, h, lam_now, s_now, a_next, s_next)
        state.push(x_0, lam_now, keep=self.order)
        return x, x_0

    @staticmethod
    def _ode_update(x_t, x_0, history, order, h, lam_now, s_now, a_next, s_next):
        if order == 1:  # (1) DDIM: D = x_0
            d = x_0
        elif order == 2:
            # (2) 2M: D = (1 + 1/(2r)) x_0 - 1/(2r) x_0_prev, r = h_prev / h
            r = (lam_now - history.lam[-1]) / h
            d = (1 + 1 / (2 * r)) * x_0 - (1 / (2 * r)) * history.x_0[-1]
        else:  # (3) 3M: first and second divided differences of x_0 in lambda
            r0 = (lam_now - history.lam[-1]) / h
            r1 = (history.lam[-1] - history.lam[-2]) / h
            d1_0 = (x_0 - history.x_0[-1]) / r0
            d1_1 = (history.x_0[-1] - history.x_0[-2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_1 = math.expm1(-h)                   # e^{-h} - 1
            phi_2 = phi_1 / h + 1.0                  # (e^{-h} - 1) / h + 1
            phi_3 = (phi_1 + h) / h ** 2 - 0.5       # (e^{-h} - 1 + h) / h^2 - 1/2
            return ((s_next / s_now) * x_t - a_next * phi_1 * x_0 + a_next * phi_2 * d1
                    - a_next * phi_3 * d2)
        # x_next = (sigma_next / sigma_now) x_t - alpha_next (e^{-h} - 1) D
        return (s_next / s_now) * x_t - a_next * math.expm1(-h) * d

    @staticmethod
    def _sde_update(x_t, x_0, history, order, h, lam_now, s_now, a_next, s_next, noise):
        # x_next = (sigma_next / sigma_now) e^{-h} x_t + alpha_next (1 - e^{-2h}) (D0 + D1 / 2)
        #          + sigma_next sqrt(1 - e^{-2h}) z, D1 = (x_0 - x_0_prev) / r (midpoint rule)
        one_minus_e2h = -math.expm1(-2.0 * h)
        x = ((s_next / s_now) * math.exp(-h)) * x_t + (a_next * one_minus_e2h) * x_0
        if order == 2:
            r = (lam_now - history.lam[-1]) / h
            x = x + (0.5 * a_next * one_minus_e2h) * ((x_0 - history.x_0[-1]) / r)
        return x + (s_next * math.sqrt(one_minus_e2h)) * noise


def _unipc_rhos(hh: float, rks: List[float], order: int, predictor: bool) -> np.ndarray:
    """UniPC's rho coefficients (Algorithms 2, 3 with B(h) = e^h - 1): the solution of
    R rho = b, R_ij = r_j^(i-1), b_i = (i - 1)! h phi_{i+1}(h) / B(h), i = 1..order, over the
    previous steps' r_j (and r = 1 for the corrector's new point). hh = -h (data prediction).
    Order 2 predictor and order 1 corrector: rho = 1/2 (the paper's simplified form)."""
    if (predictor and order == 2) or (not predictor and order == 1):
        return np.array([0.5])
    b_h = math.expm1(hh)
    h_phi_k = b_h / hh - 1.0  # h phi_2(h) over h, built up by phi_{k+1} = (phi_k - 1/k!) / h
    rks_all = np.array(rks + [1.0], dtype=np.float64)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks_all ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.stack(rows), np.array(b)
    if predictor:
        return np.linalg.solve(R[:-1, :-1], b[:-1])
    return np.linalg.solve(R, b)


def _unipc_update(x, x_0_list, lam_list, lam_to, a_to, s_from, s_to, order, predictor,
                  x_0_new=None):
    """One UniP (predictor) or UniC (corrector) update from the point lam_list[-1] with sample x
    to lam_to. x_0_list, lam_list: the history, most recent last; x_0_new: the corrector's model
    x_0 at the new point."""
    h = lam_to - lam_list[-1]
    hh = -h
    m0 = x_0_list[-1]
    rks, d1s = [], []
    for k in range(1, order):  # divided differences against the k-th previous point
        rk = (lam_list[-1 - k] - lam_list[-1]) / h
        rks.append(rk)
        d1s.append((x_0_list[-1 - k] - m0) / rk)
    rhos = _unipc_rhos(hh, rks, order, predictor)
    b_h = math.expm1(hh)
    # x_ = (sigma_to / sigma_from) x - alpha_to (e^{-h} - 1) m0: the first-order (DDIM) part
    out = (s_to / s_from) * x - (a_to * b_h) * m0
    res = sum(float(rho) * d for rho, d in zip(rhos, d1s)) if d1s else 0.0
    if not predictor:
        res = res + float(rhos[-1]) * (x_0_new - m0)
    return out - (a_to * b_h) * res


@dataclass
class UniPCSampler:
    """UniPC bh2 of order 2 or 3 with its corrector on every step but the first (free: it reuses
    the network output at the new point): S evaluations at `solver_points`, then clean data."""
    T: int
    steps: int
    skip_schedule: str = "quadratic"
    order: int = 2
    alphas_bar: Optional[np.ndarray] = field(default=None, repr=False)
    points: Optional[np.ndarray] = None
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.order not in (2, 3):
            raise ValueError(f"UniPC has orders 2 and 3 here, got {self.order}")
        if self.points is None:
            _check_steps_for_order("UniPC", self.steps, self.order)
        self.timesteps = sampler_points(self.points, self.T, self.steps, self.skip_schedule,
                                        self.alphas_bar)
        self.steps = len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return False

    def new_state(self) -> Any:
        return _History()

    def step(self, diffusion, model_output, x_t, i, noise, clip, state: _History):
        t_now = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        x_0 = predict(diffusion, model_output, x_t, t_now, clip).x_0
        lam_now = vp_lambda(diffusion, t_now)
        a_now, s_now = vp_alpha_sigma(diffusion, t_now)
        if state.x_prev is not None:
            # (1) UniC: correct the sample the network was just evaluated at, with its output
            s_prev = vp_alpha_sigma(diffusion, int(self.timesteps[i - 1]))[1]
            x_t = _unipc_update(state.x_prev, state.x_0, state.lam, lam_now, a_now, s_prev,
                                s_now, state.order_prev, predictor=False, x_0_new=x_0)
        state.push(x_0, lam_now, keep=self.order)
        # (2) order: warm-up from 1, at most the number of steps left, zero-SNR points unused
        order = min(self.order, len(self.timesteps) - i, max(1, state.finite()))
        state.x_prev, state.order_prev = x_t, order
        if t_next < 0:
            return x_0, x_0  # order 1 to lambda = +inf: exactly x_0
        # (3) UniP: predict the next sample
        a_next, s_next = vp_alpha_sigma(diffusion, t_next)
        x = _unipc_update(x_t, state.x_0, state.lam, vp_lambda(diffusion, t_next), a_next,
                          s_now, s_next, order, predictor=True)
        return x, x_0
