"""
The fine-tuning strategies of THEORY.md §2–§3, starting from the aligned weights θ_0.

    none     min ℓ_f(θ)                                         plain fine-tuning
    loss     min ℓ_f(θ) + λ·ℓ_s'(θ)                             Case I, alignment loss constraint
    param    min ℓ_f(θ)  s.t.  ‖θ − θ_0‖₂ ≤ r                    Case II, by projection
    penalty  min ℓ_f(θ) + (γ/2)·‖θ − θ_0‖₂²                      Case II, soft variant
    fisher   min ℓ_f(θ) + (γ/2)·(θ − θ_0)ᵀ diag(F)(θ − θ_0)       Case II, soft, Fisher metric

A strategy is one class, registered in STRATEGIES by its name: train.py takes its CLI
choices, flag checks and run keys from it, lab/sweep.py its grids and run ids, lab/bench.py its
variants and theory.py the case it belongs to. To add one, subclass Strategy, set its
class attributes, override the hooks it needs, and add it to STRATEGIES (README, "Adding
a strategy").

The norm runs over all trainable parameters as one flat vector. On a GPU nothing here
reads a value back to the host: the distance and the projection stay on the device, so
the training step never waits for them. On CPU there is no device to wait for, and
project_ reads the distance to skip a pass over the weights inside the ball.
"""

import math

import torch


SYMBOLS = {"radius": "r", "lam": "λ", "gamma": "γ"}  # a hyper-parameter's name in THEORY.md


class Strategy:
    """Plain fine-tuning, and the base of every strategy. It holds a frozen copy of θ_0;
    the training loop calls, per fine-tuning run and step:
        s.setup(model, draw_proxy)                  (once, at θ_0, before the first step)
        loss = s.objective(task_loss, proxy_loss)   (before backward)
        s.before_step(params)                       (after backward, before optimizer.step)
        s.after_step(params)                        (after optimizer.step)
    Class attributes say what the rest of the project needs to know:
        name         the --constraint value
        case         "I" (a loss on proxy safety data), "II" (stay near θ_0) or None
        hparams      the TrainConfig fields it reads, each a number ≥ 0 (checked here)
        sweep_param  the one of them a sweep grid varies (None: nothing to vary)
        grid         the values lab/sweep.py gives it unless told others (--grid NAME=...)
        needs_proxy  whether it draws a batch of proxy safety data D_s' every step
    """
    name, case, hparams, sweep_param, needs_proxy = "none", None, (), None, False
    grid = ()

    def __init__(self, params, **hp):
        self.check(hp)
        for k in self.hparams:
            setattr(self, k, hp[k])
        # θ_0, a frozen copy taken when fine-tuning starts
        self.theta0 = [p.detach().clone() for p in params]
        self._delta = self._buf = None  # CPU scratch, allocated on first use

    @classmethod
    def describe(cls, hp):
        """'param, r = 0.1': the strategy and its hyper-parameters, in THEORY.md's symbols."""
        return ", ".join([cls.name] + [f"{SYMBOLS.get(k, k)} = {hp[k]:g}" for k in cls.hparams])

    @classmethod
    def check(cls, hp):
        """Raise ValueError naming the flag of a missing or bad hyper-parameter."""
        for k in cls.hparams:
            if k not in hp:  # a new strategy whose field TrainConfig does not have yet
                raise ValueError(f"strategy {cls.name!r} reads --{k}, which is not a field of TrainConfig: add "
                                 f"`{k}: float = ...` to TrainConfig in train.py (docs/extending.md)")
            v = hp.get(k)
            if not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):  # also NaN
                raise ValueError(f"--{k} {v} must be a finite number ≥ 0 (--constraint {cls.name})")

    def setup(self, model, draw_proxy):
        """Called once at θ_0; draw_proxy(n) returns n examples (x, y, mask) of D_s'."""

    def objective(self, task_loss, proxy_loss=None):
        return task_loss

    def before_step(self, params):
        pass

    def after_step(self, params):
        pass

    def distance(self, params):
        """‖θ − θ_0‖₂ as a 0-d tensor on the device (no host sync)."""
        return distance(params, self.theta0, chunk=self._chunk())

    def _scratch(self):
        # CPU: one buffer for θ − θ_0 (the soft penalty adds it to the gradients), reused every
        # step; a fresh one per step costs page-faulted allocations, ~40% of the penalty's
        # time at GPT-2 size (BENCHMARKS.md). CUDA: none; the caching allocator reuses memory
        if self._delta is None and self.theta0[0].device.type == "cpu":
            self._delta = [torch.empty_like(t) for t in self.theta0]
        return self._delta

    def _chunk(self):
        # CPU: a small buffer in which θ − θ_0 is formed a piece at a time (see distance)
        if self._buf is None and self.theta0[0].device.type == "cpu":
            self._buf = torch.empty(CHUNK, dtype=self.theta0[0].dtype)
        return self._buf


class LossConstraint(Strategy):
    """Case I (THEORY.md §2): min ℓ_f + λ·ℓ_s', the proxy safety loss on its own batch."""
    name, case, hparams, sweep_param, needs_proxy = "loss", "I", ("lam",), "lam", True
    grid = (1.0, 10.0)

    def objective(self, task_loss, proxy_loss=None):
        return task_loss + self.lam * proxy_loss


class BallConstraint(Strategy):
    """Case II (THEORY.md §3): min ℓ_f s.t. ‖θ − θ_0‖ ≤ r, by projection after each step."""
    name, case, hparams, sweep_param = "param", "II", ("radius",), "radius"
    grid = (0.05, 0.5)

    def after_step(self, params):
        project_(params, self.theta0, self.radius, chunk=self._chunk())


class Penalty(Strategy):
    """Soft Case II (THEORY.md §3): min ℓ_f + (γ/2)‖θ − θ_0‖². Its gradient γ(θ − θ_0) is
    added to the gradients directly, without building a graph for the penalty."""
    name, case, hparams, sweep_param = "penalty", "II", ("gamma",), "gamma"
    grid = (0.1, 1.0)

    def before_step(self, params):
        if self.gamma > 0:
            grads = [p.grad for p in params]
            torch._foreach_add_(grads, differences(params, self.theta0, self._scratch()), alpha=self.gamma)


class FisherPenalty(Penalty):
    """Soft Case II in the Fisher metric: min ℓ_f + (γ/2)(θ − θ_0)ᵀ diag(F)(θ − θ_0), F the
    diagonal empirical Fisher of the proxy safety loss at θ_0, the mean over fisher_examples
    examples of D_s' of each example's squared gradient (EWC, Kirkpatrick et al. 2017; a
    baseline of Vaccine and Booster). Where ℓ_s' is flat at θ_0 the weights move freely, where
    it is sharp they are held: a cheap stand-in for the landscape of THEORY.md §3 (D)."""
    name, case, hparams, sweep_param = "fisher", "II", ("gamma", "fisher_examples"), "gamma"
    grid = (10.0, 100.0)

    @classmethod
    def check(cls, hp):
        super().check(hp)
        n = hp.get("fisher_examples")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"--fisher_examples {n} must be a whole number ≥ 1 (--constraint fisher)")

    def setup(self, model, draw_proxy):
        params = [p for p in model.parameters() if p.requires_grad]  # model.flat_params's order
        x, y, m = draw_proxy(self.fisher_examples)
        self.fisher = [torch.zeros_like(p) for p in params]
        was_training = model.training
        model.eval()  # F of the model itself, not of a dropout sample of it
        for i in range(len(x)):  # one example at a time: F is a mean of per-example squares
            _, loss = model(x[i:i + 1], y[i:i + 1], m[i:i + 1])
            grads = torch.autograd.grad(loss, params)
            torch._foreach_addcmul_(self.fisher, grads, grads, value=1.0 / len(x))
        model.train(was_training)

    def before_step(self, params):
        if self.gamma > 0:
            grads = [p.grad for p in params]
            d = differences(params, self.theta0, self._scratch())
            torch._foreach_mul_(d, self.fisher)  # diag(F)(θ − θ_0)
            torch._foreach_add_(grads, d, alpha=self.gamma)


STRATEGIES = {s.name: s for s in (Strategy, LossConstraint, BallConstraint, Penalty, FisherPenalty)}


def make_strategy(name, params, hp):
    """The strategy `name` over params (θ_0 = their values now), its hyper-parameters read
    from hp (a TrainConfig or a dict of its fields)."""
    if name not in STRATEGIES:
        raise ValueError(f"--constraint {name!r} is unknown: choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    get = hp.get if isinstance(hp, dict) else lambda k: getattr(hp, k, None)
    return cls(params, **{k: get(k) for k in cls.hparams})



# -----------------------------------------------------------------------------
# How θ_0 is reached: the align stage's step (THEORY.md §5 F6, "θ_0s of different sharpness").
# Every aligner reaches a minimum of ℓ_s; they differ in which one. train_step calls, per step,
#     if aligner.ascend_(params): (the gradients again, at the weights it moved to); aligner.descend_(params)
# between the backward passes and the optimizer step.


class PlainAlign:
    """Plain alignment: the optimizer steps on ∇ℓ_s(θ). The base of every aligner, with the
    class attributes of a Strategy: name (the --align_method value), hparams (TrainConfig fields)."""
    name, hparams = "plain", ()

    def __init__(self, **hp):
        self.check(hp)
        for k in self.hparams:
            setattr(self, k, hp[k])

    @classmethod
    def check(cls, hp):
        """Raise ValueError naming the flag of a bad hyper-parameter."""
        for k in cls.hparams:
            v = hp.get(k)
            if not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):  # also NaN
                raise ValueError(f"--{k} {v} must be a finite number ≥ 0 (--align_method {cls.name})")

    def ascend_(self, params):
        """Move θ where the step's gradient is to be taken; False: it is taken where θ is."""
        return False

    def descend_(self, params):
        """Put θ back, keeping the gradient taken where ascend_ moved it."""


class SharpnessAware(PlainAlign):
    """SAM (Foret et al. 2021): min_θ max_{‖ε‖₂ ≤ ρ} ℓ_s(θ + ε), to first order in ε. Each step takes
    the gradient g = ∇ℓ_s(θ), moves to θ + ρ·g/‖g‖, the steepest point of the ball to first order,
    takes the gradient there, and steps from θ with it. With the exact inner maximum, near a minimum
    it would descend ℓ_s + ½ρ²·λ_max(H_s); with mini-batch gradients the ascent direction near a
    minimum is mostly the batch's noise, and the known drift is towards a smaller trace of H_s. Either
    way it prefers flatter minima of equal loss (THEORY.md §5 F6). One step costs two forward-backward
    passes. With ρ = 0 it is plain alignment bit for bit (θ + 0·g = θ)."""
    name, hparams = "sam", ("sam_rho",)

    @torch.no_grad()
    def ascend_(self, params):
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self._theta = [p.detach().clone() for p in params]  # restored by copy: θ + ε − ε need not be θ
        torch._foreach_add_(params, torch._foreach_mul(grads, self.sam_rho / torch.clamp(norm, min=1e-12)))
        for p in params:
            p.grad = None
        self._params = params
        return True

    @torch.no_grad()
    def descend_(self, params):
        torch._foreach_copy_(self._params, self._theta)
        self._theta = self._params = None


ALIGN_METHODS = {a.name: a for a in (PlainAlign, SharpnessAware)}


def make_aligner(hp):
    """The aligner hp.align_method (a TrainConfig or a dict of its fields) with its hyper-parameters."""
    get = hp.get if isinstance(hp, dict) else lambda k: getattr(hp, k, None)
    name = get("align_method")
    if name not in ALIGN_METHODS:
        raise ValueError(f"--align_method {name!r} is unknown: choose one of {', '.join(ALIGN_METHODS)}")
    return ALIGN_METHODS[name](**{k: get(k) for k in ALIGN_METHODS[name].hparams})

# On CPU, ‖θ − θ_0‖ of a large model is memory-bound: forming θ − θ_0 whole writes and
# reads back one more copy of the model. Formed CHUNK elements at a time (4 MB in fp32,
# inside the L3 cache) it stays in the cache and the pass reads θ and θ_0 once; smaller
# pieces lose more to per-call overhead than they save (BENCHMARKS.md). Tensors of at
# most SMALL elements (biases, norms, a tiny model's everything) go through two fused
# multi-tensor calls instead: there, per-call overhead is all the cost.
CHUNK = 1 << 20
SMALL = 1 << 16


@torch.no_grad()
def differences(params, theta0, out=None):
    """θ − θ_0 tensor by tensor, written into `out` when given (then nothing is allocated)."""
    if out is None:
        return torch._foreach_sub([p.detach() for p in params], theta0)
    for d, p, p0 in zip(out, params, theta0):
        torch.sub(p, p0, out=d)
    return out


@torch.no_grad()
def distance(params, theta0, chunk=None):
    """‖θ − θ_0‖₂ over all parameters as one flat vector, a 0-d tensor (THEORY.md §3).
    `chunk`: a 1-d CPU scratch tensor; large tensors' θ − θ_0 is then formed in it a
    piece at a time, never whole."""
    params = [p.detach() for p in params]
    if chunk is None:  # GPU: two fused multi-tensor kernels
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(params, theta0))))
    is_small = [p.numel() <= SMALL for p in params]
    sq = torch.zeros((), dtype=torch.float64)
    if any(is_small):
        norms = torch._foreach_norm(torch._foreach_sub([p for p, k in zip(params, is_small) if k],
                                                       [p0 for p0, k in zip(theta0, is_small) if k]))
        sq += torch.stack(norms).double().square().sum()
    for p, p0, k in zip(params, theta0, is_small):
        if k:
            continue
        a, b, n = p.reshape(-1), p0.reshape(-1), p.numel()  # views: parameters are contiguous
        for j in range(0, n, len(chunk)):
            d = torch.sub(a[j:j + len(chunk)], b[j:j + len(chunk)], out=chunk[:min(len(chunk), n - j)])
            sq += torch.dot(d, d)
    return sq.sqrt().to(theta0[0].dtype)


@torch.no_grad()
def project_(params, theta0, radius, chunk=None):
    """θ ← θ_0 + (θ − θ_0)·min(1, r/‖θ − θ_0‖) in place (THEORY.md §3).

    Written as θ ← lerp(θ, θ_0, 1 − s) with s = min(1, r/‖θ−θ_0‖): inside the ball the
    weight is exactly 0 and lerp returns θ bit for bit, so the projection is a true
    no-op there, and on a GPU the branch is taken on the device without a host sync.
    On CPU (`chunk` given, see distance) reading the distance costs nothing, and a step
    inside the ball skips the lerp's pass over θ and θ_0: the same bits, less memory traffic.
    """
    d = distance(params, theta0, chunk)
    if chunk is not None and d.item() <= radius:
        return
    s = torch.clamp(radius / torch.clamp(d, min=1e-30), max=1.0)
    w = (1.0 - s).to(params[0].dtype)
    torch._foreach_lerp_(params, theta0, w)  # one call, not a Python loop over tensors
