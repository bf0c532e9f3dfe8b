"""Image models: the IWAE paper's 1-layer VAE and the sigmoid belief network (SBN).

VAE (Burda et al. 2015, 1 stochastic layer):
    p(z) = N(0, I_L),  p(x | z) = Π_d Bernoulli(x_d; σ(dec(z)_d)),  dec = L-h₂-h₁-D MLP,
    q(z | x) = N(μ(x), diag σ(x)²),  [μ, σ] from a D-h₁-h₂ MLP and a Gaussian head.
SBN (Mnih & Gregor 2014; VIMCO): layers of binary units, data side first (h₁, …, h_L):
    p(h_L) = Bern(σ(b)),  p(h_{l} | h_{l+1}) = Bern(σ(W h_{l+1} + c)),  p(x | h₁) likewise;
    q(h₁ | x) = Bern(σ(U x + a)),  q(h_{l+1} | h_l) likewise (linear layers throughout).
The last network call of every model is traced at ``"decoder"`` (its retval: the pixel
logits), which the image logger reads.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

import genmlx as gm
from genmlx.harness.data import build_image_data
from genmlx.harness.zoo import Task
from genmlx.harness.zoo.common import init_params, proposal_quality


class GaussianEncoder(nn.Module):
    """x ↦ (μ, σ): an MLP trunk with ``activation`` after every layer, then a Gaussian head."""

    def __init__(self, sizes, latent: int, activation: str):
        super().__init__()
        self.trunk = gm.nn.mlp(sizes, activation, out_activation=activation)
        self.head = gm.nn.GaussianHead(sizes[-1], latent)

    def __call__(self, x):
        return self.head(self.trunk(x))


class Bias(nn.Module):
    """A learned vector returned as is (the logits of a top-layer Bernoulli prior)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = mx.zeros((n,))

    def __call__(self):
        return self.bias


def vae(D: int, latent: int, hidden, activation: str, key):
    """(model, guide) of the 1-stochastic-layer VAE; the model takes no arguments and
    the guide takes the data item x."""
    kq, kp = mx.random.split(key)
    encoder = gm.nn.NeuralNetGF(init_params(GaussianEncoder([D, *hidden], latent, activation), kq), name="encoder")
    decoder = gm.nn.NeuralNetGF(init_params(gm.nn.mlp([latent, *reversed(hidden), D], activation), kp), name="decoder")

    @gm.gen
    def vae_model():
        z = gm.normal(mx.zeros((latent,)), 1.0) @ "z"
        logits = decoder(z) @ "decoder"
        return gm.bernoulli(logits=logits) @ "x"

    @gm.gen
    def vae_guide(x):
        mu, sigma = encoder(x) @ "encoder"
        return gm.normal(mu, sigma) @ "z"

    return vae_model, vae_guide


def sbn(D: int, layers, key):
    """(model, guide) of a sigmoid belief net with binary layers ``layers`` (data side
    first), latent addresses ``"h1"``, …, ``"hL"``."""
    L = len(layers)
    keys = mx.random.split(key, 2 * L + 1)
    prior = gm.nn.NeuralNetGF(Bias(layers[-1]), name="prior", lift=False)  # no inputs to lift
    # generative: h_{l+1} -> h_l, last one h_1 -> x
    gen_layers = [gm.nn.NeuralNetGF(init_params(nn.Linear(layers[l + 1], layers[l]), keys[l]), name=f"p{l + 1}")
                  for l in range(L - 1)]
    decoder = gm.nn.NeuralNetGF(init_params(nn.Linear(layers[0], D), keys[L]), name="decoder")
    # recognition: x -> h_1 -> … -> h_L
    rec_sizes = [D, *layers]
    rec = [gm.nn.NeuralNetGF(init_params(nn.Linear(rec_sizes[l], rec_sizes[l + 1]), keys[L + 1 + l]), name=f"q{l + 1}")
           for l in range(L)]

    @gm.gen
    def sbn_model():
        h = gm.bernoulli(logits=prior() @ "prior") @ f"h{L}"
        for l in range(L - 1, 0, -1):  # h_{l+1} -> h_l
            logits = gen_layers[l - 1](h.astype(mx.float32)) @ f"p{l}"
            h = gm.bernoulli(logits=logits) @ f"h{l}"
        logits = decoder(h.astype(mx.float32)) @ "decoder"
        return gm.bernoulli(logits=logits) @ "x"

    @gm.gen
    def sbn_guide(x):
        h = x
        for l in range(L):
            logits = rec[l](h.astype(mx.float32)) @ f"q{l + 1}"
            h = gm.bernoulli(logits=logits) @ f"h{l + 1}"
        return h

    return sbn_model, sbn_guide


def make_objective(cfg, model, guide, D: int):
    """The ``gm.amortized`` objective named by ``cfg.objective``."""
    kind, K = cfg.objective.kind, cfg.objective.particles
    A = gm.amortized
    if kind == "elbo":
        return A.ELBO(model, guide, num_particles=K)
    if kind == "iwae":
        return A.IWAE(model, guide, K=K)
    if kind == "dreg":
        return A.DReG(model, guide, K=K)
    if kind == "vimco":
        return A.VIMCO(model, guide, K=K)
    if kind == "rws":
        return A.RWS(model, guide, K=K)
    if kind == "nvil":
        base = init_params(gm.nn.mlp([D, 100, 1], "tanh"), mx.random.key(cfg.seed + 7))
        return A.NVIL(model, guide, baseline=_Scalar(base))
    raise ValueError(f"objective.kind: {kind!r} does not apply to image models")


class _Scalar(nn.Module):
    """Wraps a network with one output into a scalar-valued one (the NVIL baseline)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def __call__(self, x):
        return self.net(x)[..., 0]


def build(cfg) -> Task:
    data = build_image_data(cfg.data, cfg.seed)
    D = data.dim
    key = mx.random.key(cfg.seed)
    if cfg.model.kind == "vae":
        model, guide = vae(D, cfg.model.latent_dim, cfg.model.hidden, cfg.model.activation, key)
    else:
        model, guide = sbn(D, cfg.model.layers, key)
    obj = make_objective(cfg, model, guide, D)
    log = cfg.log

    def validate(k, K):
        x = data.fixed_eval("valid", log.valid_examples)
        k1, k2 = mx.random.split(k)
        bound, se = gm.amortized.log_marginal_likelihood(k1, obj, x, K=K, chunk_size=K)
        diag = proposal_quality(k2, obj, x, K)
        return {"valid_bound": bound, "valid_bound_se": se, "ess_per_n": diag["ess_per_n"], "khat": diag["khat"]}

    def evaluate(k, ecfg):
        x = data.fixed_eval("test", ecfg.examples)
        keys = mx.random.split(k, len(ecfg.bound_particles) + 2)
        out = {"test_examples": int(x.shape[0])}
        for kk, K in zip(keys, ecfg.bound_particles):
            b, se = gm.amortized.log_marginal_likelihood(kk, obj, x, K=K, chunk_size=min(K, ecfg.chunk_size))
            out[f"test_bound_K{K}"] = b
        lp, se = gm.amortized.log_marginal_likelihood(keys[-2], obj, x, K=ecfg.particles, chunk_size=min(ecfg.particles, ecfg.chunk_size))
        out.update({f"log_px_K{ecfg.particles}": lp, "log_px_se": se, "nll": -lp})
        xs = x[: min(100, x.shape[0])]
        diag = proposal_quality(keys[-1], obj, xs, min(1000, ecfg.particles))
        out.update({"test_ess_per_n": diag["ess_per_n"], "test_khat": diag["khat"]})
        return out

    def images(k, n: int = 64, raw: bool = False):
        from genmlx.harness.logging import image_grid

        k1, k2 = mx.random.split(k)
        tr = model.vsimulate(k1, (), n)
        samples = mx.sigmoid(tr["decoder"])
        x = data.fixed_eval("valid", min(n, 32))
        recon = reconstruct(k2, model, guide, x)
        pairs = mx.concatenate([x[:, None], recon[:, None]], axis=1).reshape(-1, D)
        out = {"samples": samples, "reconstructions": pairs}
        if raw:
            return out
        return {"samples": image_grid(samples, data.image_shape),
                "reconstructions": image_grid(pairs, data.image_shape, cols=16)}

    return Task(obj, data, validate, evaluate, images, model=model, guide=guide,
                observe=gm.amortized.observe_x, guide_args=gm.amortized.guide_args_x)


def reconstruct(key, model, guide, x):
    """σ(decoder logits) at z ~ q(z | x), for each row of x."""

    def one(k, xi):
        k1, k2 = mx.random.split(k)
        z = guide.simulate(k1, (xi,)).choices
        tr, _ = model.generate(k2, (), z)
        return mx.sigmoid(tr["decoder"])

    return mx.vmap(one)(mx.random.split(key, x.shape[0]), x)
