from fetcher.models import Action, Job, RelPath, RemoteFile
from fetcher.shard import make_shards


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
