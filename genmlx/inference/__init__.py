"""Inference algorithms (``gm.inference``)."""

from genmlx.inference.resampling import (  # noqa: F401
    effective_sample_size,
    log_mean_exp,
    multinomial,
    normalized_weights,
    offspring_counts,
    resample_indices,
    residual,
    stratified,
    systematic,
)
from genmlx.inference.particles import WeightedParticles  # noqa: F401
from genmlx.inference.importance import (  # noqa: F401
    ProposalCoverageError,
    check_proposal_coverage,
    importance_resampling,
    importance_sampling,
)
from genmlx.inference.mh import mh  # noqa: F401
from genmlx.inference.kernels import cycle, mh_kernel, mix, repeat, run_kernel, unconstrained_kernel  # noqa: F401
from genmlx.inference.smc import SMCResult, conditional_smc, particle_gibbs, smc  # noqa: F401
from genmlx.inference.enumerate import EnumerationResult, NotEnumerableError, enumerate_posterior  # noqa: F401
# gradient-based MCMC and variational inference on the unconstrained space
from genmlx.inference.unconstrained import UnconstrainedDensity  # noqa: F401,E402
from genmlx.inference.hmc import HMCKernel, hmc, hmc_kernel  # noqa: F401,E402
from genmlx.inference.mala import mala, mala_kernel  # noqa: F401,E402
from genmlx.inference.nuts import NUTSKernel, nuts  # noqa: F401,E402
from genmlx.inference.mcmc import MCMCResult  # noqa: F401,E402
from genmlx.inference.advi import ADVIResult, advi  # noqa: F401,E402
# particle-parallel (mx.distributed) importance sampling and SMC
from genmlx.inference.sharded import (  # noqa: F401,E402
    ShardedParticles,
    ShardedSMCResult,
    sharded_importance_resampling,
    sharded_importance_sampling,
    sharded_smc,
)
