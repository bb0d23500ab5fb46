"""Download, verification and extraction of LibriSpeech subsets, against a real local HTTP server.

The server (`Mirror`) serves archives built here in LibriSpeech layout under `/<number>/<name>`,
records every request with its Range header, and can misbehave on demand: cut a response short,
or ignore Range. Nothing of data_prep.download is replaced.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import soundfile as sf

from asr.data import read_manifest
from conftest import SR, run_asr, sine
from data_prep.download import (COMPLETE, SUBSETS, DownloadError, checksum_for, download, extract_subset,
                                fetch_splits, read_checksums)

SUBSET = "dev-clean-2"  # a Mini LibriSpeech name, so its archive lives under /31/
ARCHIVE = f"{SUBSET}.tar.gz"
TEXTS = {"19-198-0000": "HELLO WORLD", "19-198-0001": "GOOD MORNING", "26-495-0000": "BLUE SKY"}


class Mirror:
    """A local OpenSLR mirror: `files` by URL path; `requests` holds (path, Range header or None)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()  # paths whose next answer stops half way and hangs up
        self.ignore_range = False
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                wanted = self.headers.get("Range")
                mirror.requests.append((self.path, wanted))
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if wanted and not mirror.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                data = body[start:]
                if self.path in mirror.cut_once:
                    mirror.cut_once.discard(self.path)
                    data = data[: len(data) // 2]
                self.wfile.write(data)
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def gets(self, path: str) -> list[str | None]:
        """The Range header of each request for `path`, in order."""
        return [wanted for p, wanted in self.requests if p == path]


@pytest.fixture
def mirror():
    m = Mirror()
    m.thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()


def librispeech_archive(subset: str = SUBSET, extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> bytes:
    """A .tar.gz laid out as OpenSLR's: LibriSpeech/<subset>/<spk>/<chapter>/... + README.TXT."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("LibriSpeech/README.TXT", b"LibriSpeech ASR corpus\n")
        chapters: dict[str, list[str]] = {}
        for i, (uid, text) in enumerate(TEXTS.items()):
            speaker, chapter, _ = uid.split("-")
            flac = io.BytesIO()
            sf.write(flac, sine(300 + 100 * i, 0.25), SR, format="FLAC")
            add(f"LibriSpeech/{subset}/{speaker}/{chapter}/{uid}.flac", flac.getvalue())
            chapters.setdefault(f"{speaker}/{chapter}", []).append(f"{uid} {text}")
        for folder, lines in chapters.items():
            speaker, chapter = folder.split("/")
            add(f"LibriSpeech/{subset}/{folder}/{speaker}-{chapter}.trans.txt", ("\n".join(lines) + "\n").encode())
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve(mirror: Mirror, data: bytes, name: str = ARCHIVE, number: int = 31) -> str:
    mirror.files[f"/{number}/{name}"] = data
    return f"/{number}/{name}"


def sums_file(tmp_path: Path, data: bytes, name: str = ARCHIVE) -> Path:
    path = tmp_path / "sums.txt"
    path.write_text(f"{md5(data)}  {name}\n")
    return path


def prepare(mirror: Mirror, tmp_path: Path, sums: Path, *splits: str):
    return run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora",
                   "--splits", *(splits or [SUBSET]), "--out", tmp_path / "data",
                   "--mirror", mirror.url, "--checksums", sums)


# ---------------------------------------------------------------------------------------------
# Through the command line


def test_download_verify_extract_and_manifest(mirror, tmp_path):
    data = librispeech_archive()
    path = serve(mirror, data)
    sums = sums_file(tmp_path, data)

    done = prepare(mirror, tmp_path, sums)
    assert done.returncode == 0, done.stderr
    corpus = tmp_path / "corpora" / "LibriSpeech"
    assert (corpus / SUBSET / COMPLETE).is_file()
    assert (corpus / "README.TXT").read_text() == "LibriSpeech ASR corpus\n"
    assert (tmp_path / "corpora" / ARCHIVE).read_bytes() == data
    assert not list((tmp_path / "corpora").glob("*.part")) and not list((tmp_path / "corpora").glob(".*extracting"))
    rows = read_manifest(tmp_path / "data" / f"{SUBSET}.jsonl")
    assert {r.id: r.text for r in rows} == TEXTS
    assert all(r.duration == 0.25 and Path(r.audio).is_relative_to(corpus.resolve() / SUBSET) for r in rows)
    assert f"{SUBSET}: 3 utterances" in done.stdout
    assert mirror.gets(path) == [None]

    # Again: the subset is complete, so the server hears nothing and the manifest is the same.
    manifest = (tmp_path / "data" / f"{SUBSET}.jsonl").read_text()
    again = prepare(mirror, tmp_path, sums)
    assert again.returncode == 0, again.stderr
    assert mirror.requests == [(path, None)]
    assert "already extracted" in again.stderr
    assert (tmp_path / "data" / f"{SUBSET}.jsonl").read_text() == manifest


def test_cut_connection_is_resumed_with_a_range_request(mirror, tmp_path):
    data = librispeech_archive()
    path = serve(mirror, data)
    mirror.cut_once.add(path)
    sums = sums_file(tmp_path, data)

    cut = prepare(mirror, tmp_path, sums)
    assert cut.returncode == 1
    error = cut.stderr.strip().splitlines()[-1]
    assert error.startswith("asr prepare: error: ") and "run the same command again to resume" in error
    part = tmp_path / "corpora" / f"{ARCHIVE}.part"
    assert part.read_bytes() == data[: len(data) // 2]
    assert not (tmp_path / "corpora" / "LibriSpeech").exists()

    resumed = prepare(mirror, tmp_path, sums)
    assert resumed.returncode == 0, resumed.stderr
    assert mirror.gets(path) == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / "corpora" / ARCHIVE).read_bytes() == data
    assert not part.exists()
    assert len(read_manifest(tmp_path / "data" / f"{SUBSET}.jsonl")) == 3


def test_corrupt_archive_is_rejected_and_deleted(mirror, tmp_path):
    data = librispeech_archive()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    serve(mirror, bytes(bad))
    sums = sums_file(tmp_path, data)

    done = prepare(mirror, tmp_path, sums)
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error == (f"asr prepare: error: {ARCHIVE}: md5 mismatch: expected {md5(data)}, got {md5(bytes(bad))}; "
                     "the download was deleted (run again to fetch it afresh)")
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == []
    assert not (tmp_path / "data").exists()


def test_archive_with_a_member_outside_is_refused(mirror, tmp_path):
    evil = tarfile.TarInfo("../evil")
    evil.size = 4
    data = librispeech_archive(extra=[(evil, b"evil")])
    serve(mirror, data)

    done = prepare(mirror, tmp_path, sums_file(tmp_path, data))
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error == (f"asr prepare: error: {ARCHIVE}: refused member '../evil': its path holds '..'; "
                     "nothing was extracted")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "corpora" / "LibriSpeech").exists()
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == [ARCHIVE]  # verified, kept


def test_unknown_split_lists_the_valid_names(mirror, tmp_path):
    done = run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora",
                   "--splits", "dev-clean", "train-clean-1000", "--out", tmp_path / "data", "--mirror", mirror.url)
    assert done.returncode == 1
    error = done.stderr.strip()
    assert error.startswith("asr prepare: error: unknown LibriSpeech subset train-clean-1000; valid: ")
    assert "\n" not in error
    assert all(name in error for name in SUBSETS)
    assert mirror.requests == [] and not (tmp_path / "corpora").exists()


def test_options_of_download_without_it(tmp_path):
    done = run_asr("prepare", "librispeech", "--corpus-dir", tmp_path, "--splits", "dev-clean",
                   "--out", tmp_path / "data", "--mirror", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert done.stderr.strip() == "asr prepare: error: --mirror is only used with --download"


# ---------------------------------------------------------------------------------------------
# The library, piece by piece


def test_server_that_ignores_range_starts_over(mirror, tmp_path):
    data = librispeech_archive()
    path = serve(mirror, data)
    mirror.ignore_range = True
    dest = tmp_path / ARCHIVE
    Path(f"{dest}.part").write_bytes(b"not the start of the archive" * 10)

    assert download(mirror.url + path, dest, md5(data)) == dest
    assert mirror.gets(path) == ["bytes=280-"]  # asked to resume, got the whole file instead
    assert dest.read_bytes() == data
    assert not Path(f"{dest}.part").exists()


def test_whole_part_left_before_verification_is_not_fetched_again(mirror, tmp_path):
    data = librispeech_archive()
    path = serve(mirror, data)
    dest = tmp_path / ARCHIVE
    Path(f"{dest}.part").write_bytes(data)

    download(mirror.url + path, dest, hashlib.sha256(data).hexdigest())  # sha256 works the same
    assert mirror.gets(path) == [f"bytes={len(data)}-"]  # answered 416: nothing after the end
    assert dest.read_bytes() == data


def test_downloaded_archive_is_checked_and_kept(mirror, tmp_path):
    data = librispeech_archive()
    path = serve(mirror, data)
    dest = tmp_path / ARCHIVE
    dest.write_bytes(data)
    download(mirror.url + path, dest, md5(data))
    assert mirror.requests == []
    dest.write_bytes(data[:-1] + b"?")  # damaged after the fact: fetched again
    download(mirror.url + path, dest, md5(data))
    assert mirror.gets(path) == [None] and dest.read_bytes() == data


def test_missing_file_on_the_mirror(mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"/31/nothing.tar.gz: HTTP 404"):
        download(mirror.url + "/31/nothing.tar.gz", tmp_path / "nothing.tar.gz", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, why", [
    (_member("../evil"), "its path holds '..'"),
    (_member("LibriSpeech/dev-clean-2/../../../evil"), "its path holds '..'"),
    (_member("/tmp/asr-test-absolute-evil"), "its path is absolute"),
    (_member("LibriSpeech/dev-clean-2/up", tarfile.SYMTYPE, "../../.."), "symbolic link to '../../..'"),
    (_member("LibriSpeech/dev-clean-2/etc", tarfile.SYMTYPE, "/etc"), "symbolic link to '/etc'"),
    (_member("LibriSpeech/dev-clean-2/passwd", tarfile.LNKTYPE, "../../etc/passwd"), "hard link to"),
    (_member("LibriSpeech/dev-clean-2/fifo", tarfile.FIFOTYPE), "device file or a pipe"),
], ids=["dotdot", "dotdot-inside", "absolute", "symlink-out", "symlink-absolute", "hardlink-out", "fifo"])
def test_unsafe_member_refuses_the_whole_archive(tmp_path, member, why):
    archive = tmp_path / ARCHIVE
    archive.write_bytes(librispeech_archive(extra=[(member, b"evil" if member.isfile() else b"")]))
    data_dir = tmp_path / "corpora"
    with pytest.raises(DownloadError) as err:
        extract_subset(archive, data_dir, SUBSET)
    message = str(err.value)
    assert message.startswith(f"{ARCHIVE}: refused member {member.name!r}: ") and why in message
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
    assert not Path("/tmp/asr-test-absolute-evil").exists() and not (tmp_path / "evil").exists()


def test_link_chain_cannot_escape(tmp_path):
    """A link pointing inside, then a path through it that climbs out: caught on disk."""
    hop = _member("LibriSpeech/a/hop", tarfile.SYMTYPE, ".")
    out = _member("LibriSpeech/a/hop/hop/out", tarfile.SYMTYPE, "../../../../outside")
    archive = tmp_path / ARCHIVE
    archive.write_bytes(librispeech_archive(extra=[(hop, b""), (out, b"")]))
    with pytest.raises(DownloadError, match="refused member 'LibriSpeech/a/hop/hop/out'"):
        extract_subset(archive, tmp_path / "corpora", SUBSET)
    assert not (tmp_path / "corpora" / "LibriSpeech").exists()


def test_half_extracted_subset_is_never_taken_for_complete(tmp_path, mirror):
    archive = tmp_path / ARCHIVE
    archive.write_bytes(librispeech_archive())
    data_dir = tmp_path / "corpora"
    (data_dir / f".{SUBSET}.extracting" / "LibriSpeech").mkdir(parents=True)  # a killed run's leftovers
    target = extract_subset(archive, data_dir, SUBSET)
    assert target == data_dir / "LibriSpeech" / SUBSET and (target / COMPLETE).is_file()
    assert sorted(p.name for p in data_dir.iterdir()) == ["LibriSpeech"]

    (target / COMPLETE).unlink()  # as if someone else's tar had stopped half way
    with pytest.raises(DownloadError, match=f"{target} exists but holds no .complete marker"):
        fetch_splits([SUBSET], data_dir, mirror=mirror.url, checksums=sums_file(tmp_path, b""))
    assert mirror.requests == []


def test_archive_without_the_subset(tmp_path):
    archive = tmp_path / ARCHIVE
    archive.write_bytes(librispeech_archive(subset="dev-clean"))
    with pytest.raises(DownloadError, match=f"{ARCHIVE}: holds no LibriSpeech/{SUBSET}/ folder"):
        extract_subset(archive, tmp_path / "corpora", SUBSET)
    assert list((tmp_path / "corpora").iterdir()) == []


def test_read_checksums(tmp_path):
    sha = hashlib.sha256(b"x").hexdigest()
    path = tmp_path / "sums.txt"
    path.write_text(f"# OpenSLR\n\n{'A' * 32}  dev-clean.tar.gz\n{sha} *./sub/test-clean.tar.gz\n")
    assert read_checksums(path) == {"dev-clean.tar.gz": "a" * 32, "test-clean.tar.gz": sha}
    path.write_text(f"{'a' * 32}  dev-clean.tar.gz\n{'b' * 40}  test-clean.tar.gz\n")
    with pytest.raises(DownloadError, match=r"sums.txt:2: expected '<md5 or sha256 hex digest>  <file name>'"):
        read_checksums(path)


def test_checksum_for():
    dev = SUBSETS["dev-clean"]
    assert checksum_for(dev) == "42e2234ba48799c1f50f24a7926300a1"
    assert checksum_for(dev, {"dev-clean.tar.gz": "c" * 64}) == "c" * 64  # the file replaces the table
    with pytest.raises(DownloadError, match=r"sums.txt: no checksum for dev-clean.tar.gz \(it lists x.tar.gz\)"):
        checksum_for(dev, {"x.tar.gz": "c" * 32}, "sums.txt")
    unknown = type(dev)("new.tar.gz", 12, None)
    with pytest.raises(DownloadError, match=r"no published checksum for new.tar.gz; pass --checksums"):
        checksum_for(unknown)


def test_lm_resources_are_fetched_verified_and_kept_as_published(mirror, tmp_path):
    arpa = b"\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\n-1.0\t</s>\n-0.5\tHELLO\n\n\\end\\\n"
    vocab = b"HELLO\nWORLD\n"
    serve(mirror, arpa, "3-gram.pruned.1e-7.arpa.gz", number=11)
    serve(mirror, vocab, "librispeech-vocab.txt", number=11)
    sums = tmp_path / "sums.txt"
    sums.write_text(f"{md5(arpa)}  3-gram.pruned.1e-7.arpa.gz\n{md5(vocab)}  librispeech-vocab.txt\n")
    done = run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora",
                   "--lm", "3-gram.pruned.1e-7.arpa.gz", "librispeech-vocab.txt",
                   "--mirror", mirror.url, "--checksums", sums)
    assert done.returncode == 0, done.stderr
    lm = tmp_path / "corpora" / "lm"
    assert (lm / "3-gram.pruned.1e-7.arpa.gz").read_bytes() == arpa
    assert (lm / "librispeech-vocab.txt").read_bytes() == vocab
    assert done.stdout.count("lm: ") == 2

    bad = run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora",
                  "--splits", SUBSET, "--lm", "5-gram.arpa.gz", "--mirror", mirror.url)
    assert bad.returncode == 1
    assert "unknown LibriSpeech LM resource 5-gram.arpa.gz; valid: 3-gram.arpa.gz" in bad.stderr
    assert [p for p, _ in mirror.requests] == ["/11/3-gram.pruned.1e-7.arpa.gz", "/11/librispeech-vocab.txt"]

    nothing = run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora")
    assert nothing.returncode == 1 and "--splits" in nothing.stderr
