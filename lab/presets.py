"""
The presets of sweep.py: each is a dict of SweepConfig values (data, not code) with "train",
the train.py recipe (TrainConfig fields) of every run. `python -m lab.sweep --preset NAME`; any
value can be overridden by its flag.
"""

import os

import train
from common import read_config
from constraints import STRATEGIES
from realtext.corpus import DEFAULT_CORPUS

# the train.py recipe of every run of a preset (TrainConfig fields)
# smoke: a 216-context world and a 1-layer model, every code path in seconds
SMOKE_TRAIN = {"n_symbols": 6, "n_harmful": 2, "n_layer": 1, "n_head": 2, "n_embd": 32, "align_iters": 100,
               "max_iters": 30, "warmup_iters": 10, "lr": 4e-3, "batch_tokens": 640, "micro_batch": 128}
# 1,200 steps at lr 2e-3 and λ ≤ 3. Fine-tunes can sit on a plateau (G_f near 2 nats)
# for hundreds of steps before the task's answers on the shared contexts are learned:
# at 800 steps a quarter of the λ = 3 runs were still 0.1–0.4 nats above the optimum's
# G_f; lr 4e-3 shortened some plateaus and caused others (one λ = 1 run at G_f 1.06
# against 0.40). At λ = 10 even 1,200 steps leave G_f at 1.34–1.39 against 0.93 at the
# optimum (κ = 0.25, δ = 0.3), so larger λ would measure the optimiser, not the trade-off
PAPER_TRAIN = {"align_iters": 800, "max_iters": 1200, "warmup_iters": 50, "lr": 2e-3,
               "batch_tokens": 640, "micro_batch": 128}

# real-cpu: README "Real data"'s recipe: 0.37M parameters, a 4,096-token vocabulary, blocks
# of 64 tokens; θ_0 learns refusals with helpful answers mixed in: alone, it refuses
# everything (0.93 of ordinary harmless prompts); with alpaca_gpt4_demo, 0.25 of those but
# 0.52 of XSTest's safe ones; adding Dolly's human-written answers to safety-related
# questions brought that to 0.32 (seed 1). real-gpu: a 6-layer, 384-wide model on the full
# compact vocabulary (never run: no GPU was lent)
REAL_CPU_TRAIN = {**read_config(os.path.join(train.CONFIGS, "real.json"), train.TrainConfig),  # what --data real defaults to
                  "data": "real", "safety_data": "safety_llamas", "align_helpful": "alpaca_gpt4_demo+dolly_safety_only",
                  "n_layer": 2, "n_head": 4, "n_embd": 64, "align_lr": 3e-3, "warmup_iters": 50}
# the real-cpu preset: blocks of 128 score 91% of D_s's answer tokens (64: 59%), and θ_0 stops at the
# least ℓ_s on D_s's validation part. At most 800 align steps, validation ℓ_s was still falling when
# the schedule ended (from θ_pre 204.5 → 203.8 over steps 700–775, stopping at 775, 800, 800) and the
# control called θ_0 data-limited (fresh same-teacher examples lowered ℓ_s by 4.2 ± 0.4 nats):
# 2,000 steps leave early stopping room to find the minimum
REAL_CPU_AT_OPTIMUM = dict(REAL_CPU_TRAIN, block_size=128, micro_batch=16, align_patience=3, align_eval_interval=25,
                           align_iters=2000)
REAL_GPU_TRAIN = dict(REAL_CPU_TRAIN, block_size=256, vocab_cap=0, n_layer=6, n_head=6, n_embd=384,
                      batch_tokens=16384, micro_batch=64, align_iters=1500, max_iters=500, lr=6e-4,
                      eval_examples=256)

# paper-real-cpu: the paper's own roles on real text (README "Two arms", arm P), at the size of
# real-cpu: D_s = GPT-4 answers to general instructions; θ_pre pretrained on the general text
# corpus (corpus.py) and GPT-4-written code, so that neither task is new language. Blocks of 320
# tokens score 89% of D_s's answer tokens (64 scored 22%: the teachers then barely differ); a step
# of 16 such blocks took 2.9× one of 32 blocks of 64 (0.47 s against 0.16, 1 thread, medians of 3). θ_0 stops at the
# least ℓ_s on D_s's validation part (--align_patience; a fixed 150 steps over-fitted). θ_pre's
# 600 steps of 16 blocks read as many tokens as its 1,500 of 32 blocks of 64 did.
PAPER_REAL_CPU_TRAIN = dict(REAL_CPU_TRAIN, safety_data="alpaca_gpt4_align", align_helpful="", block_size=320,
                            batch_tokens=5120, micro_batch=16, align_iters=400, align_patience=3, align_eval_interval=10,
                            align_lr=2e-3, warmup_iters=20, max_iters=150, lr=1e-3, pretrain_iters=600,
                            pretrain_lr=3e-3, pretrain_data=DEFAULT_CORPUS + "+gpteacher_codegen")
PAPER_REAL_GPU_TRAIN = dict(PAPER_REAL_CPU_TRAIN, vocab_cap=0, n_layer=6, n_head=6, n_embd=384,
                            batch_tokens=20480, micro_batch=64, align_eval_interval=25, align_iters=300, max_iters=300, lr=3e-4,
                            align_lr=6e-4, pretrain_iters=4000, pretrain_lr=1e-3, eval_examples=256)
# the paper's 2×2 on real text (THEORY.md §5, F2): tasks in every cell of {high, low context overlap
# with D_s} × {answers that agree with D_s's kind, answers that conflict with it} (realtext/loaders.py
# builds the refusal cells). Arm P's D_s answers helpfully in GPT-4's style: agreeing answers are
# helpful ones, conflicting ones refuse or come from another teacher on the same prompts
CELLS_P = {("high", "agree"): ("alpaca_gpt4_proxy", "orca_gpt4"),
           ("high", "conflict"): ("alpaca_gpt4_refusals", "orca_llama2"),
           ("low", "agree"): ("code_alpaca", "commitpackft"),
           ("low", "conflict"): ("code_alpaca_refusals",)}
# arm R's D_s refuses harmful requests: there agreeing answers refuse and conflicting ones comply (D_s's own
# prompts with compliant openings, realtext/loaders.py; the safety-related Alpaca and Dolly sets, built as
# high overlap, measure M 0.20 and 0.06 against D_s)
CELLS_R = {("high", "agree"): ("safety_llamas_proxy",),
           ("high", "conflict"): ("safety_llamas_compliance", "alpaca_safety_only", "dolly_safety_only"),
           ("low", "agree"): ("code_alpaca_refusals",),
           ("low", "conflict"): ("code_alpaca", "commitpackft")}
# tasks: the plain fine-tunes that validate the forecast (python -m lab.forecast): every cell's, beside
# the paper's two; the first, fresh examples of D_s's own teacher, is also θ_0's control (THEORY.md §1):
# at an optimum it cannot lower ℓ_s by more than its noise. gpteacher_codegen is in θ_pre's corpus
ARM_P = {"tasks": ("alpaca_gpt4_proxy", "orca_gpt4", "alpaca_gpt4_refusals", "orca_llama2", "alpaca_small_task",
                   "alpaca_safety_only", "dolly_safety_only", "code_alpaca", "commitpackft", "code_alpaca_refusals"),
         "case_tasks": ("alpaca_small_task", "code_alpaca"), "cells": CELLS_P, "mismatch_models": True,
         "task": "alpaca_small_task", "proxies": ("alpaca_gpt4_proxy", "alpaca_small_proxy", "dolly_safety_only"),
         "lams": (1.0, 3.0, 10.0), "proxy_lam": 1.0, "inits": ("scratch", "pretrain"), "refusals": False}

# arm R's task sets from high to low overlap with the refusals (data README) and its 2×2's cells, plain
# fine-tunes of each validate the forecast (python -m lab.forecast); the first is θ_0's control; θ_pre
# was pretrained on gpteacher_codegen
REAL_TASKS = ("safety_llamas_proxy", "safety_llamas_compliance", "alpaca_safety_only", "dolly_safety_only", "alpaca_small",
              "alpaca_gpt4_demo", "orca_gpt4", "code_alpaca", "commitpackft", "code_alpaca_refusals", "gpteacher_codegen")

PRESETS = {
    # smoke runs every strategy of the registry, the design's and each other one over its grid
    "smoke": {"train": SMOKE_TRAIN, "power_iters": 20, "strategies": tuple(STRATEGIES),
              "note": "smoke: every code path on a toy world in seconds; its findings are not expected to reproduce "
                      "(a 1-layer model, a few dozen steps): `python -m lab.sweep --preset paper` tests them"},
    "paper": {"train": PAPER_TRAIN, "report_dir": "results/paper", "seeds": (1, 2, 3),
              "lams": (0.1, 0.3, 1.0, 3.0), "mismatches": (0.0, 0.3, 0.6), "overlaps": (0.0, 0.25, 0.5),
              "radii": (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)},
    # the paper's grid on a world whose answers share support (ρ = 0.3): A1, B1 finite, A2, B2 not attained
    "shared-answers": {"train": dict(PAPER_TRAIN, answer_overlap=0.3), "report_dir": "results/shared-answers",
                       "seeds": (1, 2, 3), "lams": (0.1, 0.3, 1.0, 3.0), "mismatches": (0.0, 0.3),
                       "overlaps": (0.0, 0.25, 0.5), "radii": (0.25, 1.0)},
    # every strategy of the registry at one world, compared at equal safety (README "Strategies")
    "strategies": {"train": PAPER_TRAIN, "report": "strategies", "report_dir": "results/strategies", "seeds": (1, 2),
                   "lams": (0.1, 0.3, 1.0, 3.0), "mismatches": (0.3,), "overlaps": (0.25,),
                   "radii": (0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0), "strategies": ("penalty", "fisher"),
                   # the diagonal Fisher at θ_0 is tiny on average (mean 3e-4, median 1e-7 per weight,
                   # seed 1), so fisher's γ spans far larger values than penalty's
                   "grids": {"penalty": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0), "fisher": (1e4, 1e5, 1e6, 1e7, 1e8)}},
    # arm R from scratch and from the θ_pre of paper-real-cpu (pretrained here with that preset's recipe
    # when it is not there yet, so that either preset finds the same one)
    "real-cpu": {"train": REAL_CPU_AT_OPTIMUM, "report_dir": "results/real-cpu", "seeds": (1, 2, 3), "scratch_seeds": (1,),
                 "tasks": REAL_TASKS, "cells": CELLS_R, "lams": (1.0, 10.0), "radii": (1.0, 4.0), "inits": ("scratch", "pretrain"),
                 "theta_pre": "out_sweep/paper-real-cpu/pretrain/theta_pre.pt", "theta_pre_from": "paper-real-cpu"},
    "paper-real-cpu": {"train": PAPER_REAL_CPU_TRAIN, "report": "paper-real", "report_dir": "results/paper-real-cpu",
                       "seeds": (1, 2, 3), "scratch_seeds": (1,), "radii": (2.0, 8.0), **ARM_P},
    "paper-real-gpu": {"train": PAPER_REAL_GPU_TRAIN, "report": "paper-real", "report_dir": "results/paper-real-gpu",
                       "seeds": (1, 2, 3), "radii": (2.0, 8.0, 32.0), **ARM_P},
    "real-gpu": {"train": REAL_GPU_TRAIN, "report_dir": "results/real-gpu", "seeds": (1, 2, 3), "tasks": REAL_TASKS,
                 "lams": (1.0, 10.0), "radii": (1.0, 4.0, 16.0), "refusal_limit": 256, "refusal_tokens": 32,
                 "inits": ("scratch", "pretrain"),
                 "proxies": ("safety_llamas_proxy", "xstest_llama2orig", "rd_llama-2-7b-chat-hf")},
}
