import json

from orca_lora import stage_store
from orca_lora.records import GapResult, StageRecord
from orca_lora.run_files import RunFiles, read_marker, read_ranks, write_marker, write_ranks


def finished_stage(directory, digest="abc", payload="weights"):
    directory.mkdir(parents=True)
    (directory / "stage.json").write_text(json.dumps({"hash": digest, "finished": True}))
    (directory / "embedder.safetensors").write_text(payload)
    return directory


def test_a_published_stage_is_fetched_whole_and_replaces_what_was_there(tmp_path):
    store = tmp_path / "store"
    stage_store.publish(store, "stage1", "abc", finished_stage(tmp_path / "first" / "stage1"))
    destination = tmp_path / "second" / "stage1"
    destination.mkdir(parents=True)
    (destination / "stale.txt").write_text("from a changed config")
    assert stage_store.fetch(store, "stage1", "abc", destination)
    assert sorted(p.name for p in destination.iterdir()) == ["embedder.safetensors", "stage.json"]
    assert (destination / "embedder.safetensors").read_text() == "weights"
    assert not [p for p in destination.parent.iterdir() if p.name.startswith(".")]  # no partial copy left


def test_an_unknown_hash_is_not_fetched_and_the_first_publication_is_kept(tmp_path):
    store = tmp_path / "store"
    assert not stage_store.fetch(store, "stage1", "abc", tmp_path / "run" / "stage1")
    stage_store.publish(store, "stage2", "abc", finished_stage(tmp_path / "a" / "stage2", payload="first"))
    stage_store.publish(store, "stage2", "abc", finished_stage(tmp_path / "b" / "stage2", payload="second"))
    assert (stage_store.entry(store, "stage2", "abc") / "embedder.safetensors").read_text() == "first"
    assert [p.name for p in (store / "stage2").iterdir()] == ["abc"]


def test_an_entry_without_its_marker_is_not_a_result(tmp_path):
    store = tmp_path / "store"
    (stage_store.entry(store, "stage1", "abc")).mkdir(parents=True)
    assert not stage_store.fetch(store, "stage1", "abc", tmp_path / "run" / "stage1")


def test_a_fetched_stage_2_brings_its_ranks(tmp_path):
    """Stage 2's result is its ranks.json (the marker holds none): a copy from the store carries it."""
    computed = RunFiles(tmp_path / "first")
    ranks = GapResult(["layers.0.blocks.0"], [0.2], {"body.layers.0.blocks.0.attn.qkv": 3}, 4.0, 192, None)
    write_ranks(computed, ranks)
    write_marker(computed, "stage2", StageRecord("abc", True, 1.0))
    stage_store.publish(tmp_path / "store", "stage2", "abc", computed.stage("stage2"))
    fetched = RunFiles(tmp_path / "second")
    fetched.root.mkdir()
    assert stage_store.fetch(tmp_path / "store", "stage2", "abc", fetched.stage("stage2"))
    assert read_ranks(fetched) == ranks and read_marker(fetched, "stage2").result is None


def test_a_measurement_is_computed_once_per_hash_and_read_back_exactly(tmp_path):
    calls = []
    value = [{"gap": 0.1 + 0.2, "floor": float("nan"), "ci_high": float("inf")}]

    def measure():
        calls.append(1)
        return value

    first = stage_store.measured_once(tmp_path, "abc", measure)
    second = stage_store.measured_once(tmp_path, "abc", measure)
    assert len(calls) == 1 and first is value
    assert second[0]["gap"] == 0.1 + 0.2 and second[0]["ci_high"] == float("inf") and second[0]["floor"] != 0
    assert stage_store.measured_once(tmp_path, "other", measure) is value and len(calls) == 2
    assert stage_store.measured_once(None, "abc", measure) is value and len(calls) == 3  # no store: measured
    assert sorted(path.name for path in (tmp_path / "measurements").iterdir()) == ["abc.json", "other.json"]
