"""The MNIST VAE ELBO-gradient step of ``bench_vae.py`` in Pyro (PyTorch, CPU).

Runs in its own venv (torch + pyro-ppl, no MLX): ``bench_vae.py --pyro-python PY``
calls ``PY benchmarks/bench_vae_pyro.py --batches … --repeats …`` and reads the JSON it
prints last: ``{"trace_elbo": {batch: median seconds}, "jit_trace_elbo": {…}}``.

Same architecture as the MLX versions: encoder 784-200-(2×10) with tanh, q(z | x) =
N(μ(x), diag σ(x)²) with σ = softplus(·) + 1e-4; decoder 10-200-784 with tanh giving
Bernoulli logits; prior N(0, I₁₀). One step is ``SVI.step``: a single-sample
reparameterized ELBO estimate for the batch (inside ``pyro.plate``), its gradient and an
Adam update (lr 1e-3), with ``Trace_ELBO`` (eager autograd) and, as a second row,
``JitTrace_ELBO`` (TorchScript-traced loss). torch uses 2 threads (``--threads``).
Timing: untimed warm-up steps, then the median of ``repeats`` steps (more if they add up
to less than 0.5 s). Data: random binary images, as in ``bench_vae.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch import nn

X_DIM, H, Z = 784, 200, 10


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(X_DIM, H)
        self.loc, self.scale = nn.Linear(H, Z), nn.Linear(H, Z)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(Z, H), nn.Linear(H, X_DIM)

    def forward(self, z):
        return self.out(torch.tanh(self.hidden(z)))


def make_svi(loss_cls) -> SVI:
    pyro.clear_param_store()
    enc, dec = Encoder(), Decoder()

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        m, s = enc(x)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(m, s).to_event(1))

    return SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss_cls())


def time_steps(loss_cls, B: int, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one ``svi.step`` at batch ``B`` after ``warmup`` untimed steps."""
    torch.manual_seed(B)
    x = (torch.rand(B, X_DIM) < 0.3).float()
    svi = make_svi(loss_cls)
    for _ in range(warmup):
        svi.step(x)
    times: list[float] = []
    while len(times) < repeats or sum(times) < 0.5:
        t0 = time.perf_counter()
        svi.step(x)  # returns a Python float: the step has finished
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {name: {B: time_steps(cls, B, args.repeats) for B in args.batches}
           for name, cls in (("trace_elbo", Trace_ELBO), ("jit_trace_elbo", JitTrace_ELBO))}
    out["versions"] = {"torch": torch.__version__, "pyro": pyro.__version__,
                       "threads": torch.get_num_threads()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
