"""experiments/anatomy.py: the report's numbers hang together."""

import numpy as np

from experiments import anatomy
from experiments.configs import anatomy as anatomy_config


def test_anatomy_report_on_a_random_model(tmp_path):
  cfg = anatomy_config.get_config("smoke")
  cfg.workdir = str(tmp_path)
  rep = anatomy.report(cfg)
  L = rep["num_layers"]
  assert len(rep["norm_growth"]["rms"]) == L + 1
  np.testing.assert_allclose(
    np.array(rep["norm_growth"]["rms"][1:]) / rep["norm_growth"]["rms"][:-1],
    rep["norm_growth"]["growth"],
    rtol=1e-5,
  )
  assert len(rep["writes"]["attn_energy"]) == L
  assert len(rep["logit_lens"]["accuracy"]) == L + 1
  # Every (layer, kind, mode) once; ablating a write changes the output.
  assert len(rep["interventions"]) == L * 2 * 2
  assert all(r["kl"] > 0 for r in rep["interventions"] if r["mode"] == "ablate")
  assert rep["drift"]["float32"]["max_abs_logit_diff"] < 1e-4
  anatomy.plot(rep, str(tmp_path))
  assert (tmp_path / "anatomy.png").exists()
  assert (tmp_path / "interventions.png").exists()
