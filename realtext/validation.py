"""
θ_0 at its alignment optimum (THEORY.md §1, "θ_0 at the optimum"). The theory's θ_0 is a minimum of
the alignment loss: gradient near 0, so that a fine-tune's first-order change of ℓ_s is what the task
does, not what alignment left unfinished. On a finite D_s, training to the end of a fixed schedule
over-fits (training-part ℓ_s keeps falling, held-out ℓ_s turns back up), and a fine-tune on almost
any text then "improves" safety by undoing the over-fit. So, with --align_patience N, alignment is
evaluated every --align_eval_interval steps on D_s's validation part (textdata.validation_part: prompts
never trained on, and never the held-out part that measures ℓ_s), the weights of its lowest
validation loss are kept, and training stops after N evaluations in a row without a new lowest.
θ_0 is those weights; its checkpoint records the whole validation curve and the stop step.
"""

import math

from common import DataError


def check_validation(world, patience):
    """A DataError, before anything is written, where D_s has no validation part to stop on."""
    if "validation" not in getattr(world, "eval_sets", {}):
        raise DataError(f"--align_patience {patience} stops alignment on D_s's validation part, and "
                        f"{world.wc.safety} has none (too few examples): a larger --safety_data, or "
                        f"--align_patience 0")


class EarlyStop:
    """Validation-minimum early stopping of the align stage (the module docstring)."""

    def __init__(self, patience, world, loss_of):
        """loss_of(model, batches): the held-out loss of evaluate.py (nats per sequence), passed in
        because this layer sits below it."""
        check_validation(world, patience)
        self.patience, self.world, self.loss_of = patience, world, loss_of
        self.curve = []  # [step, validation ℓ_s (nats per sequence)] at every evaluation
        self.best_step, self.best_loss, self.best_state = None, math.inf, None

    def update(self, step, model):
        """Validation ℓ_s of the model's weights at `step`, kept as the best if it is the lowest yet."""
        loss = self.loss_of(model, self.world.eval_batches("validation"))
        self.curve.append([step, loss])
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return loss

    def done(self):
        """Whether the last `patience` evaluations all failed to reach a new lowest."""
        return sum(step > self.best_step for step, _ in self.curve) >= self.patience

    def restore(self, model):
        """Put the best weights back into the model (on its device)."""
        model.load_state_dict(self.best_state)

    def state_dict(self):
        return {"curve": self.curve, "best_step": self.best_step, "best_loss": self.best_loss,
                "best_state": self.best_state}

    def load_state_dict(self, state):
        self.curve, self.best_step = [list(c) for c in state["curve"]], state["best_step"]
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]

    def record(self):
        """What a θ_0 checkpoint keeps (and reports print): the curve, the stop step, its loss."""
        return {"patience": self.patience, "stop_step": self.best_step, "validation_loss": self.best_loss,
                "last_step": self.curve[-1][0], "validation_curve": self.curve,
                "validation_examples": len(self.world.eval_sets["validation"][0])}
