"""experiments/sweep.py and experiments/sweeps/: units, resume after a kill,
rows, summary, figures."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.configs import sweep as sweep_config
from experiments.sweeps import figures
from experiments.sweeps import loop
from experiments.sweeps import plan
from experiments.sweeps import report
from experiments.sweeps import store
from experiments.sweeps import units
from experiments.sweeps.task_data import TaskData
import kvjax
from kvjax import compress
from kvjax import ingest
from kvjax.tasks import suite


def _cfg(workdir, **overrides):
  cfg = sweep_config.get_config("smoke")
  cfg.methods = "snapkv,kivi2"
  cfg.ratios = "0,0.5"
  cfg.tasks = "needle"
  cfg.context_len = 72  # longer than SnapKV's window of 64
  cfg.num_examples = 2
  cfg.workdir = str(workdir)
  cfg.plots = False
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_plan_units_and_bad_names():
  cfg = _cfg(
    "/tmp/unused",
    methods="snapkv,kivi2,snapkv+kivi2",
    ratios="0,0.5,0.9",
    tasks="needle,mqar",
  )
  units = plan.plan_units(cfg)
  keys = [(u["method"], u["ratio"], u["task"], u["mode"]) for u in units]
  assert len(keys) == len(set(keys))
  # none once per task (agnostic only); snapkv and the composition at each
  # ratio > 0; kivi2 once; all of them in both modes.
  assert len(units) == 2 * 1 + 2 * 2 * (2 + 1 + 2)
  assert ("none", 0.0, "mqar", "agnostic") in keys
  assert ("none", 0.0, "mqar", "aware") not in keys
  assert ("snapkv", 0.0, "mqar", "agnostic") not in keys
  for field, value, match in (
    ("methods", "snapkv,bogus", "unknown method"),
    ("ratios", "0.5,1.0", "ratios"),
    ("tasks", "needle,chess", "unknown suite entry"),
    ("modes", "agnostic,psychic", "unknown mode"),
  ):
    with pytest.raises(ValueError, match=match):
      plan.plan_units(_cfg("/tmp/unused", **{field: value}))
  with pytest.raises(ValueError, match="policy\\+codec"):
    plan.method_transform("kivi2+snapkv", 0.5)
  with pytest.raises(ValueError, match="unknown method 'none'"):
    plan.plan_units(_cfg("/tmp/unused", methods="none,snapkv"))


def test_interrupted_sweep_resumes_with_every_unit_once(tmp_path):
  cfg = _cfg(tmp_path, stop_after_units=3)
  rows = loop.run(cfg)
  assert len(rows) == 3
  path = os.path.join(tmp_path, "results.jsonl")
  # A kill in the middle of a write leaves a torn last line.
  with open(path, "a") as f:
    f.write('{"key": "torn')
  cfg.stop_after_units = 0
  rows = loop.run(cfg)
  units = plan.plan_units(cfg)
  keys = [r["key"] for r in rows]
  assert len(keys) == len(units) == len(set(keys))
  with open(path) as f:
    lines = f.read().splitlines()
  assert len(lines) == len(units)  # the torn line is gone, nothing doubled
  # A rerun finds everything done and adds nothing.
  assert len(loop.run(cfg)) == len(units)
  with open(path) as f:
    assert len(f.read().splitlines()) == len(units)
  by = {(r["method"], r["ratio"], r["mode"]): r for r in rows}
  none = by[("none", 0.0, "agnostic")]
  assert none["ger"] == 0.0 and none["kl"] == pytest.approx(0.0, abs=1e-6)
  assert none["reachability"] == pytest.approx(1.0)
  half = by[("snapkv", 0.5, "agnostic")]
  assert half["logical_bytes_per_token"] == pytest.approx(
    0.5 * none["logical_bytes_per_token"], rel=0.05
  )
  assert 0.0 <= half["ger"] <= 1.0 and half["kl"] > 0
  # Evicted everywhere implies evicted from each layer.
  assert len(half["ger_per_layer"]) == 2
  assert half["ger"] <= min(half["ger_per_layer"]) + 1e-6
  assert none["ger_per_layer"] == [0.0, 0.0]
  # KIVI-2's window of 128 never fills on a 72-token context: refused, with
  # the numbers, and listed apart in the summary.
  kivi = by[("kivi2", 0.0, "aware")]
  assert kivi["status"] == "refused" and "never fill" in kivi["reason"]
  assert "accuracy" not in kivi
  summary = open(os.path.join(tmp_path, "summary.md")).read()
  assert "Refused" in summary and "| aware | kivi2 |" not in summary
  for name in ("summary.md", "facts.json"):
    assert os.path.exists(os.path.join(tmp_path, name))
  facts = json.load(open(os.path.join(tmp_path, "facts.json")))
  assert len(facts["active_support"]["median_per_layer"]) == 2


def test_every_default_method_runs_once(tmp_path):
  """Each method of the default config, at ratio 0.5 (quantizers at 0) on
  one task, question-agnostic (the aware path is the interrupted sweep's
  and test_aware_units_observe_only_the_question_proper's): no refusal,
  bytes below the uncompressed cache, codecs store every kept entry coded
  but KIVI's window."""
  cfg = _cfg(
    tmp_path,
    methods=sweep_config.get_config().methods,
    ratios="0,0.5",
    context_len=256,
    modes="agnostic",
  )
  rows = loop.run(cfg)
  assert len(rows) == 1 + 11
  by = {(r["method"], r["mode"]): r for r in rows}
  none = by[("none", "agnostic")]
  for (method, mode), r in by.items():
    assert r["status"] == "ok", (method, mode, r.get("reason"))
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["kl"])
    if method == "none":
      continue
    assert (
      r["logical_bytes_per_token"] < 0.75 * none["logical_bytes_per_token"]
    ), (method, mode)
    coded = r["coded_share"][0]
    if "kivi" in method:  # whole blocks of 128 coded, the rest windowed
      assert 0.5 < coded <= 1.0, (method, coded)
    elif method == "turboquant3":
      assert coded == 1.0
    else:
      assert coded == 0.0


def test_learned_method_runs_once_on_the_gated_model(tmp_path):
  """SP-KV in the sweep (kvjax-tiny-spkv): once per task, agnostic only;
  its cache physically smaller; the question it answers is exactly one
  gated pass over context + question; refused on an ungated model and on
  a mesh before anything is written."""
  cfg = _cfg(
    tmp_path,
    model="kvjax-tiny-spkv",
    methods="spkv",
    ratios="0,0.75",
    context_len=200,  # past the gate's window of 128
    reachability=False,
  )
  units_ = plan.plan_units(cfg)
  assert [
    (u["method"], u["mode"]) for u in units_ if u["method"] == "spkv"
  ] == [("spkv", "agnostic")]
  rows = loop.run(cfg)
  by = {(r["method"], r["mode"]): r for r in rows}
  spkv_row, none = by[("spkv", "agnostic")], by[("none", "agnostic")]
  assert spkv_row["status"] == "ok" and spkv_row["ratio"] == 0.0
  assert 0.0 < spkv_row["kept_share"] < 1.0 and none["kept_share"] == 1.0
  assert spkv_row["physical_bytes_per_token"] < none["physical_bytes_per_token"]
  summary = open(os.path.join(tmp_path, "summary.md")).read()
  assert "| agnostic | spkv | learned |" in summary
  # The unit's question == one hard-gated pass over context + question.
  config, params = common.load_model("kvjax-tiny-spkv")
  td = TaskData(cfg, config, params, "needle")
  cache, side = units.compress_unit(td, units_[1] | dict(method="spkv"))
  logits, _, _, _ = units.ask(
    params,
    cache,
    td.question,
    td.qmask,
    config=config,
    backend=td.backend,
    **side,
  )
  ids = jnp.concatenate([td.context, td.question], axis=1)
  mask = jnp.concatenate([td.context_mask, td.qmask], axis=1)
  whole = kvjax.forward(
    params,
    ids,
    kvjax.init_cache(config, ids.shape[0], ids.shape[1]),
    config=config,
    token_mask=mask,
    write_gate=side["write_gate"],
  ).logits[:, td.L :]
  real = np.asarray(td.qmask)
  np.testing.assert_allclose(
    np.asarray(logits)[real], np.asarray(whole)[real], atol=1e-4, rtol=1e-4
  )
  for bad, match in (
    (dict(model="random:tiny"), "kvjax-tiny-spkv"),
    (dict(mesh="seq:-1"), "without config.mesh"),
  ):
    workdir = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
      loop.run(_cfg(workdir, methods="spkv", **bad))
    assert not workdir.exists()


def test_reread_context_compresses_the_last_read(tmp_path):
  """config.ingest_passes=2 (compute before eviction): every unit
  compresses the last of two reads; the baseline's question equals
  `kvjax.ingest.reread` then a question on the same weights; eviction
  keeps one read's bytes and finds the answer tokens at their context
  positions; per-slot attention readers are refused question-agnostic,
  saying why, and run question-aware."""
  cfg = _cfg(tmp_path, methods="snapkv,h2o", ingest_passes=2)
  rows = loop.run(cfg)
  by = {(r["method"], r["mode"]): r for r in rows}
  assert all(r["ingest_passes"] == 2 for r in rows)
  refused = by[("h2o", "agnostic")]
  assert refused["status"] == "refused" and "all 2 reads" in refused["reason"]
  assert by[("h2o", "aware")]["status"] == "ok"
  snap, none = by[("snapkv", "agnostic")], by[("none", "agnostic")]
  # The answer tokens are found at their context positions (offset by
  # the first read): none evicted without compression, not all at 0.5.
  assert none["ger"] == 0.0 and 0.0 <= snap["ger"] < 1.0
  assert snap["reachability"] is None
  assert snap["kept_share"] == pytest.approx(0.5, abs=0.05)
  config, params = common.load_model(cfg.model)
  td = TaskData(cfg, config, params, "needle")
  L = td.L
  pos, valid = np.asarray(td.cache.pos), np.asarray(td.cache.valid)
  assert sorted(set(pos[valid].tolist())) == list(range(L, 2 * L))
  out = ingest.reread(
    params, td.context, config=config, passes=2, reserve=td.Tq
  )
  want = kvjax.forward(
    params, td.question, out.cache, config=config, token_mask=td.qmask
  ).logits
  real = np.asarray(td.qmask)
  np.testing.assert_allclose(
    td.logits[real], np.asarray(want)[real], atol=1e-4, rtol=1e-4
  )
  # One read's bytes: K and V of every layer and kv head per token.
  per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
  assert none["logical_bytes_per_token"] == per_token
  with pytest.raises(ValueError, match="ingest_passes"):
    plan.plan_units(_cfg(tmp_path, ingest_passes=0))


def test_bad_configs_fail_before_anything_is_written(tmp_path):
  workdir = tmp_path / "w"
  for field, value, match in (
    ("ratios", "abc", "config.ratios='abc' is not a comma-separated list"),
    ("methods", "", "config.methods is empty"),
    ("num_examples", 0, "config.num_examples=0: must be int in"),
    ("support_share", 0.0, "config.support_share=0.0: must be float in"),
    ("context_len", -4, "config.context_len=-4"),
    ("confidence", float("nan"), "config.confidence"),
  ):
    cfg = _cfg(workdir)
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
      loop.run(cfg)
    assert not workdir.exists(), field


def test_unknown_config_field_is_one_clear_line():
  with pytest.raises(SystemExit, match="--config.bogus: no such config"):
    common.check_config_overrides(
      ["sweep", "--config.bogus=1"], sweep_config.get_config()
    )
  common.check_config_overrides(
    ["sweep", "--config.ratios=0,0.5"], sweep_config.get_config()
  )


def test_changed_code_reruns_every_unit(tmp_path, monkeypatch):
  """Rows computed by other code are never reused: a changed transform
  definition gives a new run tag, so every unit runs again."""
  policies = tmp_path / "policies.py"
  policies.write_text(open(compress.policies.__file__).read())
  files = store.code_files()
  monkeypatch.setattr(
    store,
    "code_files",
    lambda: [f for f in files if "policies" not in f] + [str(policies)],
  )
  cfg = _cfg(tmp_path / "w", methods="snapkv", ratios="0,0.5")
  first = loop.run(cfg)
  assert len(loop.run(cfg)) == len(first)  # nothing new: all done
  path = tmp_path / "w" / "results.jsonl"
  assert len(path.read_text().splitlines()) == len(first)
  policies.write_text(
    policies.read_text().replace("_BIG = 1e30", "_BIG = 1e29")
  )  # a changed definition
  rerun = loop.run(cfg)
  assert len(rerun) == len(first)
  assert {r["key"].split("|")[0] for r in rerun}.isdisjoint(
    {r["key"].split("|")[0] for r in first}
  )
  assert len(path.read_text().splitlines()) == 2 * len(first)


def test_summary_collapse_and_pearson():
  rows = []
  for task in ("a", "b"):
    rows.append(
      dict(
        method="none",
        ratio=0.0,
        task=task,
        mode="agnostic",
        accuracy=1.0,
        hallucination_rate=0.0,
        abstention_rate=0.0,
        ger=0.0,
        reachability=1.0,
        kl=0.0,
        physical_bytes_per_token=100.0,
        logical_bytes_per_token=100.0,
        seconds=1.0,
      )
    )
    for ratio, acc, ger in ((0.5, 0.9, 0.1), (0.75, 0.6, 0.3), (0.9, 0.2, 0.7)):
      rows.append(
        dict(
          rows[0],
          method="snapkv",
          ratio=ratio,
          task=task,
          accuracy=acc,
          hallucination_rate=ger / 2,
          ger=ger,
          logical_bytes_per_token=100 * (1 - ratio),
        )
      )
  rows.append(
    dict(
      method="kivi2",
      ratio=0.0,
      task="a",
      mode="aware",
      status="refused",
      reason="never fills a block",
    )
  )
  text, facts = report.summarize(rows)
  assert facts["refused"] == [("aware", "kivi2", 0.0)]
  assert "- aware kivi2 0: never fills a block" in text
  assert facts["collapse_ratio"] == {"agnostic/snapkv": 0.9}
  assert facts["pearson_ger_hallucination"]["agnostic"] == pytest.approx(1.0)
  assert np.isnan(facts["pearson_ger_hallucination"]["aware"])
  assert "| agnostic | snapkv | 0.75 | 0.600 |" in text


def test_aware_units_observe_only_the_question_proper():
  """A multihop walk's question-aware compression sees `QUERY x1 ARROW`,
  not the walk's later tokens (they would name the next link)."""
  cfg = _cfg("/tmp/unused", tasks="multihop_k2", context_len=40)
  config, params = common.load_model(cfg.model)
  td = TaskData(cfg, config, params, "multihop_k2")
  observed = np.asarray(td.observe_mask)  # [B, T - L]
  assert observed.shape == (2, td.Tq)
  np.testing.assert_array_equal(observed[:, :3], True)
  np.testing.assert_array_equal(observed[:, 3:], False)
  answered = np.asarray(td.qmask)  # the question run still reads the walk
  np.testing.assert_array_equal(answered[:, :6], True)
  np.testing.assert_array_equal(td.batch.answers.shape, (2, 2))


def test_run_tag_follows_the_weights_and_the_task_definitions(monkeypatch):
  """Rows of other weights or other task definitions are never reused."""
  cfg = _cfg("/tmp/unused")
  config, params = common.load_model(cfg.model)
  tag = store.run_tag(cfg, config, params)
  assert store.run_tag(cfg, config, params) == tag
  retrained = jax.tree.map(lambda x: x * 1.01, params)
  assert store.run_tag(cfg, config, retrained) != tag
  # Same weights, another architecture setting (e.g. an edited config.json).
  assert store.run_tag(cfg, config.replace(rope_theta=5e4), params) != tag
  changed = [
    e._replace(params=dict(e.params, num_distractors=5))
    if e.name == "needle"
    else e
    for e in suite.SUITE
  ]
  monkeypatch.setattr(suite, "SUITE", tuple(changed))
  assert store.run_tag(cfg, config, params) != tag


def test_code_fingerprint_covers_every_module_that_computes_a_row():
  """A sweep module is either hashed into the run tag or only reads rows
  (a new module must be put in one group or the other)."""
  hashed = {os.path.relpath(f, store.ROOT) for f in store.code_files()}
  modules = {
    os.path.relpath(f, store.ROOT)
    for f in glob.glob(
      os.path.join(store.ROOT, "experiments", "sweeps", "*.py")
    )
  }
  reads_rows = {
    f"experiments/sweeps/{n}.py"
    for n in ("__init__", "store", "report", "figures")
  }
  assert modules - reads_rows <= hashed
  assert not reads_rows & hashed
  assert {
    "experiments/common.py",
    "kvjax/compress/registry.py",
    "kvjax/tasks/suite.py",
    "kvjax/compress/policies.py",
    "kvjax/kernels.py",  # loaded only when a Pallas backend is chosen
    "pallas_kernels/tiles.py",
    "pallas_kernels/decode_attention/kernel.py",
    "pallas_kernels/flash_attention/kernel.py",
  } <= hashed
  # Every repository module the sweep loads (directly or not) is hashed,
  # unless it only reads rows (imported in a fresh process: other tests
  # load other modules).
  listing = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys, experiments.sweep; "
      "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) "
      "if getattr(m, '__file__', None)))",
    ],
    cwd=store.ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  loaded = {
    os.path.relpath(os.path.abspath(f), store.ROOT)
    for f in listing
    if os.path.abspath(f).startswith(store.ROOT + os.sep)
  }
  loaded = {
    f
    for f in loaded
    if f.startswith(("kvjax/", "experiments/", "pallas_kernels/"))
    and not f.startswith("experiments/configs/")
  }
  reads_only = reads_rows | {
    "experiments/sweep.py",
    "experiments/__init__.py",
    "experiments/plotting.py",
  }
  assert "kvjax/compress/policies.py" in loaded
  assert loaded - reads_only <= hashed, sorted(loaded - reads_only - hashed)


def test_extra_inputs_follow_the_transforms_declaration():
  """The oracle declares `future_mass` (`KVTransform.extras`); it gets the
  question's attention, a transform declaring nothing gets nothing, and
  an optional input the sweep has no value for (Finch's question_lengths)
  is left out: Finch then runs on the observed queries; one needing an
  input the sweep lacks is refused with its name."""
  cfg = _cfg("/tmp/unused", context_len=72)
  config, params = common.load_model(cfg.model)
  td = TaskData(cfg, config, params, "needle")
  oracle = plan.method_transform("oracle", 0.5)
  assert set(units.extra_inputs(td, oracle)) == {"future_mass"}
  assert units.extra_inputs(
    td, plan.method_transform("oracle+kivi2", 0.5)
  ).keys() == {"future_mass"}
  assert units.extra_inputs(td, plan.method_transform("snapkv", 0.5)) == {}
  needy = compress.snapkv(0.5)._replace(extras=("crystal_ball",))
  with pytest.raises(ValueError, match="crystal_ball"):
    units.extra_inputs(td, needy)
  finch = plan.method_transform("finch", 0.5)
  assert finch.extras == ("question_lengths",)
  assert units.extra_inputs(td, finch) == {}
  row = units.run_unit(
    cfg, td, dict(method="finch", ratio=0.5, task="needle", mode="aware")
  )
  assert row["status"] == "ok", row
  # Key re-rotation renumbers the kept positions: no eviction metrics.
  row = units.run_unit(
    cfg,
    td,
    dict(method="key_rerotation", ratio=0.5, task="needle", mode="agnostic"),
  )
  assert row["status"] == "ok" and row["ger"] is None, row
  assert row["reachability"] is None and 0.0 <= row["accuracy"] <= 1.0
  for mode in plan.MODES:
    row = units.run_unit(
      cfg, td, dict(method="oracle", ratio=0.5, task="needle", mode=mode)
    )
    assert row["status"] == "ok" and 0.0 <= row["accuracy"] <= 1.0


def test_figures_from_rows(tmp_path):
  rows = [
    dict(
      method="none",
      ratio=0.0,
      task="a",
      mode="agnostic",
      accuracy=1.0,
      hallucination_rate=0.0,
      ger=0.0,
      physical_bytes_per_token=100.0,
      logical_bytes_per_token=100.0,
    )
  ]
  for mode in plan.MODES:
    for ratio, ger in ((0.5, 0.1), (0.75, 0.3), (0.9, 0.7)):
      rows.append(
        dict(
          rows[0],
          method="snapkv",
          ratio=ratio,
          mode=mode,
          accuracy=1 - ger,
          hallucination_rate=ger / 2,
          ger=ger,
          logical_bytes_per_token=100 * (1 - ratio),
        )
      )
  support = dict(
    share=0.9,
    bin_edges=[1, 2, 4],
    histogram=[[3, 1], [2, 2]],
    median_per_layer=[1.0, 2.0],
  )
  figures.plot(rows, support, str(tmp_path))
  for name in figures.FILES:
    assert (tmp_path / name).exists(), name


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("methods", "snapkv,snapkv", "lists \\['snapkv'\\] more than once"),
    ("ratios", "0.5,0.50", "lists \\['0.5'\\] more than once"),
    ("tasks", "needle,needle", "more than once"),
    ("methods", "h2o+kivi2", "h2o\\+kivi2 at ratio 0.5 cannot be built"),
  ],
)
def test_plan_refuses_repeated_units_and_refused_compositions(
  field, value, match
):
  """A repeated value would run and average its units twice; a chain that
  `chain` refuses would fail mid-sweep after rows were written."""
  cfg = _cfg("/tmp/unused", **{field: value})
  with pytest.raises(ValueError, match=match):
    plan.plan_units(cfg)
