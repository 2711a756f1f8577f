from pathlib import Path

from fetcher.models import Action, Job, RelPath, RemoteFile
from fetcher.shard import Shard, make_shards


def job(name: str, size: int | None) -> Job:
    return Job(RemoteFile("http://h/" + name, RelPath(name), size, True), Action.NEW)


def test_every_job_once_and_biggest_first() -> None:
    jobs = [job(f"f{i}", (i * 7919) % 100_000) for i in range(500)]
    shards = make_shards(jobs, max_files=32, max_bytes=1 << 20)
    seen = [j.file.path for s in shards for j in s.jobs]
    assert sorted(seen) == sorted(j.file.path for j in jobs)
    assert all(len(s.jobs) <= 32 for s in shards)
    for s in shards:
        sizes = [j.file.size for j in s.jobs]
        assert sizes == sorted(sizes, reverse=True)


def test_balanced_by_bytes() -> None:
    jobs = [job(f"f{i}", 1000 + (i * 37) % 5000) for i in range(320)]
    shards = make_shards(jobs, max_files=32, max_bytes=1 << 30)
    loads = [s.nbytes for s in shards]
    assert len(shards) == 10
    assert max(loads) - min(loads) <= 5000  # within one file's size


def test_big_file_alone_and_unknown_sizes() -> None:
    jobs = [job("big", 100 << 20), job("a", 10), job("b", None)]
    shards = make_shards(jobs, max_files=32, max_bytes=32 << 20)
    assert [j.file.path for j in shards[0].jobs] == ["big"]
    assert {j.file.path for s in shards[1:] for j in s.jobs} == {"a", "b"}


def test_empty() -> None:
    assert make_shards([]) == []


def test_the_coordinator_packs_small_new_files_in_bigger_shards(tmp_path: Path) -> None:
    # pipeline._submit: files that hold a lane each (big, updates) go first, a few to a
    # shard; small new files, which lanes take in trains, more to a shard.
    from fetcher.config import build_job
    from fetcher.download import pipelinable
    from fetcher.models import Reporter, Summary
    from fetcher.pipeline import _Run, _submit
    from fetcher.state import State

    class Recorder:
        shard_files = 2
        small_shard_files = 8

        def __init__(self) -> None:
            self.shards: list[Shard] = []

        def submit(self, shard: Shard) -> None:
            self.shards.append(shard)

    job = build_job({"url": "http://127.0.0.1:1/", "dest": str(tmp_path)}, "t")
    state = State.open(tmp_path)
    try:
        run = _Run(job, tmp_path, state, state.begin_run(job.url), Summary(url=job.url, dest=str(tmp_path), started=0.0), Reporter())  # fmt: skip
        rec = Recorder()
        run.executor = rec  # type: ignore[assignment]

        def j(name: str, size: int, action: Action = Action.NEW) -> Job:
            return Job(RemoteFile(f"http://127.0.0.1:1/{name}", RelPath(name), size, True), action)

        jobs = [j(f"s{i}", 1000) for i in range(20)] + [j(f"b{i}", 2 << 20) for i in range(5)]
        jobs += [j(f"c{i}", 1000, Action.CHANGED) for i in range(3)]
        _submit(run, jobs)
    finally:
        state.close()
    kinds = [{pipelinable(x) for x in s.jobs} for s in rec.shards]
    assert all(len(k) == 1 for k in kinds), "a shard mixes the two kinds"
    light = [s for s, k in zip(rec.shards, kinds, strict=True) if k == {True}]
    heavy = [s for s, k in zip(rec.shards, kinds, strict=True) if k == {False}]
    assert rec.shards[: len(heavy)] == heavy  # the ones that hold a lane go out first
    assert max(len(s.jobs) for s in heavy) <= 2 and max(len(s.jobs) for s in light) <= 8
    assert len(light) == 3  # 20 small files, 8 to a shard at most: 3 shards, not 10
    assert sorted(x.file.path for s in rec.shards for x in s.jobs) == sorted(
        x.file.path for x in jobs
    )
    assert set(run.outstanding) == {x.file.path for x in jobs}
