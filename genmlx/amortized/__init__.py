"""Amortized inference (``gm.amortized``): objectives that train guides (and models),
a compiled training step, evaluation of guides as proposals, and guide save/load."""

from genmlx.amortized.coverage import AddressCoverageError, check_coverage
from genmlx.amortized.elbo import ELBO
from genmlx.amortized.evaluate import importance_log_weights, log_marginal_likelihood, proposal_diagnostics
from genmlx.amortized.io import GuideMismatchError, load_guide, save_guide
from genmlx.amortized.iwae import DReG, IWAE
from genmlx.amortized.kl import kl_divergence, register_kl
from genmlx.amortized.nvil import NVIL
from genmlx.amortized.objective import Objective, guide_args_x, observe_x
from genmlx.amortized.proposals import IndependenceProposal, mh_proposal
from genmlx.amortized.rws import RWS, NeuralIS
from genmlx.amortized.train import global_norm, make_train_step
from genmlx.amortized.vimco import VIMCO

__all__ = [
    "ELBO", "IWAE", "DReG", "VIMCO", "NVIL", "RWS", "NeuralIS", "Objective",
    "make_train_step", "global_norm", "log_marginal_likelihood", "proposal_diagnostics",
    "importance_log_weights", "save_guide", "load_guide", "GuideMismatchError",
    "AddressCoverageError", "check_coverage", "kl_divergence", "register_kl",
    "observe_x", "guide_args_x", "mh_proposal", "IndependenceProposal",
]
