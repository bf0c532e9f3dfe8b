"""Model zoo: model/guide pairs, their datasets, objectives and evaluation, by name.

``build_task(cfg)`` returns a :class:`Task` bundling everything the runner needs:

- ``objective`` with ``loss(key, data) -> (loss, metrics)`` and ``trainable()``;
- ``data`` (:class:`~genmlx.harness.data.ImageData` or ``SimulatedData``);
- ``validate(key) -> metrics`` (quick held-out bound, ESS/N, k̂ of the guide);
- ``evaluate(key, cfg_eval) -> metrics`` (test bounds, log p(x) with K = 5000, …);
- ``images(key) -> {tag: [H, W] array}`` for image data (samples, reconstructions);
- for ``genmlx infer``: ``model``, ``guide``, ``observe(x)``, ``guide_args(x)``,
  ``model_args(x)`` (default: no arguments) and, for sequential models, ``smc(x, proposal)``
  → keyword arguments of ``gm.inference.smc`` (model, args, observations, proposal).

Models: ``vae`` (IWAE paper 1-layer: q = D-200-200-(2×50) tanh, p mirrored, Bernoulli
pixels), ``sbn`` (sigmoid belief net, linear layers of binary units), the sbibm tasks
``two_moons``, ``gaussian_linear``, ``slcp`` (exact likelihoods), ``ssm`` (linear-Gaussian
state-space model over ``gm.Unfold`` with a NeuralIS-trained per-step proposal for SMC),
and ``toy`` (harness self-test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Task:
    objective: Any
    data: Any
    validate: Callable
    evaluate: Callable
    images: Callable | None = None
    model: Any = None
    guide: Any = None
    observe: Callable | None = None
    guide_args: Callable | None = None
    extras: dict = field(default_factory=dict)
    model_args: Callable | None = None
    smc: Callable | None = None


def build_task(cfg) -> Task:
    """The :class:`Task` for an :class:`~genmlx.harness.config.ExperimentConfig`."""
    kind = cfg.model.kind
    if kind == "toy":
        from genmlx.harness.zoo import toy

        obj = toy.ToyObjective(seed=cfg.seed)
        data = toy.toy_data(cfg.data.batch_size, cfg.data.prefetch)
        return Task(obj, data,
                    validate=lambda key, K: toy.toy_validate(obj, data, key, K),
                    evaluate=lambda key, ecfg: toy.toy_evaluate(obj, data, key))
    if kind in ("vae", "sbn"):
        from genmlx.harness.zoo import images

        return images.build(cfg)
    if kind == "ssm":
        from genmlx.harness.zoo import ssm

        return ssm.build(cfg)
    from genmlx.harness.zoo import sbibm

    return sbibm.build(cfg)
