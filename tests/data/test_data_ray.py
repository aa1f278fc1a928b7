"""`data.engine: ray` against `engine: local` on the real shared datasets: byte-identical outputs and report,
and the distributed banding step finding the same near-duplicate clusters as the single-process LSH index.

One in-process Ray instance (2 CPUs) serves the whole module. Skipped when Ray is not installed."""

from __future__ import annotations

import csv
import json
import random
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from domaintune.config import load_config
from domaintune.data.minhash import LSHIndex, MinHasher
from domaintune.data.pipeline import run_data
from domaintune.layout import RunLayout

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'domaintune[ray]'): engine ray untested")
pytest.importorskip("ray.data", reason="ray[data] is not installed: engine ray untested")

from domaintune.data.ray_engine import banding_pairs, resolve_keep_first  # noqa: E402

EXAMPLES = REPO_ROOT / "examples"
OUTPUTS = ("train", "val", "test", "quarantine")


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


def _perturb(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(max(1, len(chars) // 200)):
        chars[rng.randrange(len(chars))] = chr(0x4E00 + rng.randrange(20000))
    return "".join(chars)


@pytest.fixture(scope="module")
def zh_slice(shared_datasets, tmp_path_factory) -> Path:
    """1,500 real rows of the Chinese CSV (GB18030) + 150 lightly perturbed copies (near duplicates) and
    20 verbatim copies at later positions, and two malformed lines (parse errors) in the middle and at the end."""
    src = shared_datasets / "zh_medical_dialogue" / "internal_medicine_sample.csv"
    with src.open(encoding="gb18030", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for _, r in zip(range(1500), reader)]
    rng = random.Random(7)
    out = list(rows)
    for i in rng.sample(range(1200), 150):
        r = list(rows[i])
        r[3] = _perturb(r[3], rng)
        out.insert(rng.randrange(i + 1, len(out) + 1), r)
    for i in rng.sample(range(1200), 20):
        out.insert(rng.randrange(i + 1, len(out) + 1), list(rows[i]))
    path = tmp_path_factory.mktemp("zh") / "zh_slice.csv"
    with path.open("w", encoding="gb18030", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for k, r in enumerate(out):
            if k == 700:
                fh.write("broken,line\n")
            w.writerow(r)
        fh.write("another,broken,line,with,too,many,columns\n")
    return path


def _compare(tmp_path: Path, cfg_for) -> dict:
    reports = {}
    for engine in ("local", "ray"):
        cfg = cfg_for(engine)
        reports[engine] = run_data(cfg, RunLayout(tmp_path / engine), progress=False)
    holdouts = [p.stem for p in sorted((tmp_path / "local" / "data").glob("holdout_*.jsonl"))]
    for name in (*OUTPUTS, *holdouts):
        a = (tmp_path / "local" / "data" / f"{name}.jsonl").read_bytes()
        b = (tmp_path / "ray" / "data" / f"{name}.jsonl").read_bytes()
        assert a == b, f"{name}.jsonl differs between the local and the ray engine"
    local, remote = reports["local"], reports["ray"]
    assert (local.pop("engine"), remote.pop("engine")) == ("local", "ray")
    for r in (local, remote):
        r.pop("output_dir")
    assert json.dumps(local, sort_keys=True, ensure_ascii=False) == json.dumps(
        remote, sort_keys=True, ensure_ascii=False
    )
    return local


def test_zh_csv_ray_engine_is_byte_identical(ray_session, zh_slice, tmp_path):
    def cfg_for(engine):
        cfg = load_config(EXAMPLES / "medical-zh.yaml", output_dir=tmp_path / engine)
        cfg.data.sources[0].path = zh_slice
        cfg.data.general = None
        cfg.data.sample.train = cfg.data.sample.val = cfg.data.sample.test = None  # every kept row is compared
        cfg.data.batch_size = 128  # 14 chunks: duplicates across and within chunks
        cfg.data.engine = engine
        return cfg

    report = _compare(tmp_path, cfg_for)
    src = report["sources"]["zh_medical_dialogue"]
    assert src["input"] == 1672 and src["balanced"]
    assert src["dropped"]["parse: wrong column count"] == 2  # replayed at the local engine's quarantine position
    assert report["dedup"]["exact_dropped"] >= 20 and report["dedup"]["near_dropped"] >= 40
    assert sum(report["split"]["sizes"].values()) > 300
    assert report["holdout"]["rows"] > 10  # the example's held-out departments, written alike by both engines


def test_medquad_ray_engine_is_byte_identical(ray_session, shared_datasets, tmp_path):
    folders = {"CancerGov": "1_CancerGov_QA", "NIDDK": "5_NIDDK_QA"}

    def cfg_for(engine):
        cfg = load_config(EXAMPLES / "medical-en.yaml", output_dir=tmp_path / engine)
        cfg.data.sources = [s for s in cfg.data.sources if s.name in folders]
        for s in cfg.data.sources:
            s.path = shared_datasets / "medquad" / folders[s.name]
        cfg.data.general = None
        cfg.data.sample.train = cfg.data.sample.val = cfg.data.sample.test = None
        cfg.data.engine = engine
        return cfg

    report = _compare(tmp_path, cfg_for)
    assert set(report["sources"]) == set(folders) and report["balanced"]
    assert report["totals"]["input"] > 1000 and sum(report["split"]["sizes"].values()) > 100
    assert report["holdout"]["by_source"] == {"CancerGov": 0, "NIDDK": 100}  # the example holds out NIDDK


def test_banding_step_finds_the_local_index_clusters(ray_session, zh_slice):
    """Near-duplicate clusters: the distributed banding + keep-first resolution == `LSHIndex.add_batch`."""
    with zh_slice.open(encoding="gb18030", newline="") as fh:
        texts = ["\n".join(r[1:]) for r in csv.reader(fh) if len(r) == 4][1:]
    hasher = MinHasher(128, 5, 3)
    sigs = hasher.signatures(texts)
    ids = [f"row{i}" for i in range(len(texts))]
    batch = 100
    local = LSHIndex(0.8, 128)
    expected = {}
    for start in range(0, len(texts), batch):
        for i, verdict in enumerate(local.add_batch(sigs[start : start + batch], ids[start : start + batch])):
            if verdict.duplicate_of is not None:
                expected[start + i] = (verdict.duplicate_of, verdict.similarity)
    assert len(expected) >= 100  # the 150 perturbed copies (and the 20 verbatim ones)

    rows = ray_session.data.from_items(
        [{"pos": i, "id": ids[i], "sig": sigs[i]} for i in range(len(texts))], override_num_blocks=2
    )
    edges = banding_pairs(rows, LSHIndex(0.8, 128), partitions=4)
    starts = list(range(0, len(texts), batch))
    got = resolve_keep_first(edges, lambda pos: bisect_right(starts, pos) - 1)
    assert got == expected
    clusters = {}
    for dup, (rep, _) in got.items():
        clusters.setdefault(rep, set()).add(dup)
    assert len(clusters) >= 90 and all(int(rep[3:]) < min(d) for rep, d in clusters.items())
    assert np.all(np.diff(sorted(got)) > 0)


@pytest.mark.parametrize(
    "data",
    [
        {"dedup": {"exact": False, "word_ngram": 2}, "split": {"by": "time", "time_field": "day"}},
        {"dedup": {"near": False}, "batch_size": 16, "sample": {"train": 40}},
    ],
    ids=["near-only+time-split", "exact-only+sample"],
)
def test_ray_engine_dedup_options_and_broken_lines(ray_session, tmp_path, data):
    """Dedup switched partly off, another split and sampling, broken JSON lines at the start and the end."""
    from test_data_pipeline import cfg_for, corpus

    rows = corpus(150)
    rows += [dict(r) for r in rows[:15]]  # exact copies
    rows += [dict(r, a=r["a"] + " more") for r in rows[20:35]]  # near copies (one extra word)
    lines = ["{broken"] + [json.dumps(r) for r in rows] + ['{"q": "unterminated']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def cfg_for_engine(engine):
        return cfg_for(tmp_path, {**data, "engine": engine, "filters": {"outlier_sigma": None}})

    report = _compare(tmp_path, cfg_for_engine)
    assert report["totals"]["input"] == 182 and report["balanced"]
    assert report["funnel"][1] == {**report["funnel"][1], "stage": "parse", "dropped": 2}
    dedup = report["dedup"]
    assert (dedup["exact_dropped"] > 0) == data["dedup"].get("exact", True)
    assert (dedup["near_dropped"] > 0) == data["dedup"].get("near", True)


def test_workers_flag_is_refused_with_engine_ray(tmp_path):
    from test_data_pipeline import cfg_for, corpus

    from domaintune.errors import UserError
    from domaintune.utils.io import write_jsonl

    write_jsonl(tmp_path / "in.jsonl", corpus(10))
    with pytest.raises(UserError, match=r"--workers is for data\.engine: local"):
        run_data(cfg_for(tmp_path, {"engine": "ray"}), RunLayout(tmp_path / "run"), workers=2, progress=False)


def test_user_error_in_a_ray_task_reaches_the_user_as_one_line(ray_session, tmp_path):
    """A config problem met inside a map task (the tokenizer of a missing model) is the same UserError as locally."""
    from test_data_pipeline import cfg_for, corpus

    from domaintune.errors import UserError
    from domaintune.utils.io import write_jsonl

    write_jsonl(tmp_path / "in.jsonl", corpus(10))
    cfg = cfg_for(
        tmp_path,
        {"engine": "ray", "filters": {"min_tokens": 1}},
        model={"name_or_path": str(tmp_path / "no-such-model")},
    )
    with pytest.raises(UserError, match=r"model.name_or_path: .*no-such-model does not exist$"):
        run_data(cfg, RunLayout(tmp_path / "run"), progress=False)
