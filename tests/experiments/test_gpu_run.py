"""The GPU experiment driver's pure parts (experiments/iwae/gpu_run.py): the batch-size
choice from a throughput probe, and every table row's config + overrides validating."""

import pytest

from experiments.iwae import gpu_run as G
from genmlx.harness.config import load_config


def _probe(rates):
    out = []
    for b, (sync, asyn) in rates.items():
        out.append({"batch": b, "loop": "sync", "steps_per_s": sync, "images_per_s": sync * b})
        out.append({"batch": b, "loop": "async", "steps_per_s": asyn, "images_per_s": asyn * b})
    return out


def test_choose_takes_most_images_per_s_above_the_step_rate_floor():
    # the H200 probe of the IWAE k = 50 step (pipelined loop: 363, 300, 260, 212 steps/s)
    probe = _probe({100: (284, 363), 200: (308, 300), 400: (245, 260), 800: (188, 212)})
    assert G.choose(probe, 0.7)["batch"] == 400  # 800 runs at 58 % of batch 100's rate
    assert G.choose(probe, 0.5)["batch"] == 800
    assert G.choose(probe, 0.99)["batch"] == 100  # only the smallest batch qualifies


def test_choose_reads_the_pipelined_rates():
    # the loops disagree: by the sync (unpipelined) rates batch 800 qualifies (90/100), by the
    # pipelined rates the harness actually runs at it does not (100/400)
    probe = _probe({100: (100, 400), 800: (90, 100)})
    assert G.choose(probe, 0.7)["batch"] == 100


@pytest.mark.parametrize("name", sorted(G.ROWS))
def test_every_row_config_validates(name):
    cfg_file, overrides = G.ROWS[name]
    cfg = load_config(G.EXP / cfg_file, [*overrides, "data.batch_size=100", "optim.schedule=constant"])
    assert cfg.data.batch_size == 100
