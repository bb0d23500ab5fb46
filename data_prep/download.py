"""OpenSLR's LibriSpeech resources -> verified archives -> extracted subset folders.

    <mirror>/<number>/<archive> ──download──▶ <data-dir>/<archive>.part
        ──checksum──▶ <data-dir>/<archive> ──extract──▶ <data-dir>/.<subset>.extracting/
        ──rename──▶ <data-dir>/LibriSpeech/<subset>/ (with its .complete marker)

Every step is safe to interrupt and to run again:
- a download that stops leaves `<archive>.part`; the next run asks the server for the rest (an
  HTTP `Range: bytes=N-` request) and starts over only when the server ignores that;
- an archive gets its final name only once its checksum matches; a mismatch deletes it;
- a subset is extracted into a folder beside the target and renamed into place whole, with a
  `.complete` marker inside, so a subset folder without one is never taken for complete;
- an archive holding a member that could land outside the extraction folder (an absolute path,
  `..`, a link pointing out, a device file) is refused, and nothing of it is put in place.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from asr.errors import ASRError

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://www.openslr.org/resources"  # <mirror>/<resource number>/<file name>
CORPUS_FOLDER = "LibriSpeech"  # every archive holds LibriSpeech/<subset>/...
COMPLETE = ".complete"  # written inside a subset folder before it is renamed into place
CHUNK = 1 << 20  # bytes read, hashed and written at a time
TIMEOUT_S = 60  # a server silent this long counts as a cut connection
USER_AGENT = "asr-data-prep/0.1 (+https://www.openslr.org)"
DIGEST_ALGORITHMS = {32: "md5", 64: "sha256"}  # hex digest length -> algorithm


class DownloadError(ASRError):
    """A resource cannot be downloaded, verified or extracted; the message says which and why."""


@dataclass(frozen=True)
class Resource:
    """One file OpenSLR publishes, at `<mirror>/<slr>/<name>`."""

    name: str
    slr: int  # OpenSLR resource number: the folder under the mirror
    md5: str | None  # None: no published checksum known; one must come from --checksums


# The md5 sums OpenSLR publishes for LibriSpeech (SLR12, resources/12/md5sum.txt) and Mini
# LibriSpeech (SLR31, resources/31/md5sum.txt), and those of the LM resources (SLR11) that other
# LibriSpeech recipes verify their downloads against.
_SLR12 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
_SLR31 = {
    "train-clean-5": "5df7d4e78065366204ca6845bb08f490",
    "dev-clean-2": "6d7ab67ac6a1d2c993d050e16d61080d",
}
_SLR11 = {
    "3-gram.arpa.gz": "74cbb837e582378c26c602e1c8cbcb9c",
    "3-gram.pruned.1e-7.arpa.gz": "9a0f1325bcaf3a0f7b7be4be10823c2a",
    "3-gram.pruned.3e-7.arpa.gz": "8f67ec741827742eee05799ab7605b50",
    "4-gram.arpa.gz": "6abdcd5b055bd482e4f9defe91d40408",
    "librispeech-vocab.txt": "bf3cc7a50112831ed8b0afa40cae96a5",
    "librispeech-lexicon.txt": "28f72663f6bfed7cd346283c064c315b",
    "librispeech-lm-norm.txt.gz": "c83c64c726a1aedfe65f80aa311de402",
}

# Audio subset name -> its archive; LM resources by file name; every resource by file name.
SUBSETS: dict[str, Resource] = {
    **{name: Resource(f"{name}.tar.gz", 12, md5) for name, md5 in _SLR12.items()},
    **{name: Resource(f"{name}.tar.gz", 31, md5) for name, md5 in _SLR31.items()},
}
LM_RESOURCES: dict[str, Resource] = {name: Resource(name, 11, md5) for name, md5 in _SLR11.items()}
RESOURCES: dict[str, Resource] = {r.name: r for r in (*SUBSETS.values(), *LM_RESOURCES.values())}


# ---------------------------------------------------------------------------------------------
# Checksums


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """{file name: hex digest} from `<hexdigest>  <file name>` lines, as md5sum/sha256sum write
    them; md5 (32 hex digits) or sha256 (64), told apart by length. Blank and # lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DownloadError(f"{path}: cannot read checksums: {e}") from None
    sums = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*([0-9a-fA-F]+)\s+\*?(\S.*?)\s*", line)
        if match is None or len(match[1]) not in DIGEST_ALGORITHMS:
            raise DownloadError(f"{path}:{number}: expected '<md5 or sha256 hex digest>  <file name>', "
                                f"got {line.strip()!r}")
        sums[PurePosixPath(match[2]).name] = match[1].lower()
    if not sums:
        raise DownloadError(f"{path}: no checksums in it (expected '<hex digest>  <file name>' lines)")
    return sums


def checksum_for(resource: Resource, checksums: dict[str, str] | None = None,
                 source: str = "the checksums file") -> str:
    """The digest `resource` must have: from `checksums` when given (it replaces the table), else
    the published one."""
    if checksums is not None:
        if resource.name not in checksums:
            raise DownloadError(f"{source}: no checksum for {resource.name} "
                                f"(it lists {', '.join(sorted(checksums))})")
        return checksums[resource.name]
    if resource.md5 is None:
        raise DownloadError(f"no published checksum for {resource.name}; pass --checksums FILE "
                            f"with a line '<md5 or sha256>  {resource.name}'")
    return resource.md5


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file, read a chunk at a time."""
    return _hash_file(path, algorithm).hexdigest()


def _algorithm(digest: str) -> str:
    if len(digest) not in DIGEST_ALGORITHMS or not re.fullmatch(r"[0-9a-f]+", digest):
        raise DownloadError(f"{digest!r} is neither an md5 (32 hex digits) nor a sha256 (64) digest")
    return DIGEST_ALGORITHMS[len(digest)]


# ---------------------------------------------------------------------------------------------
# Download


def resource_url(resource: Resource, mirror: str = DEFAULT_MIRROR) -> str:
    return f"{mirror.rstrip('/')}/{resource.slr}/{resource.name}"


def download(url: str, dest: str | os.PathLike, checksum: str, progress: bool = False) -> Path:
    """Fetch `url` to `dest`, verified against `checksum` (md5 or sha256 hex); returns `dest`.

    Bytes go to `<dest>.part`; one left by an earlier run is resumed with a Range request (the
    server may ignore it and send everything: the part then starts over). Only a complete file
    whose digest matches is renamed to `dest`; a mismatch deletes it. A `dest` already there
    is kept when its digest matches and fetched again when not.
    """
    dest = Path(dest)
    algorithm = _algorithm(checksum)
    if dest.exists():
        actual = file_digest(dest, algorithm)
        if actual == checksum:
            log.info("%s: already downloaded and verified", dest)
            return dest
        log.warning("%s: %s is %s, not %s; downloading it again", dest, algorithm, actual, checksum)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    hasher = _fetch(url, part, algorithm, progress)
    actual = hasher.hexdigest()
    if actual != checksum:
        part.unlink()
        raise DownloadError(f"{dest.name}: {algorithm} mismatch: expected {checksum}, got {actual}; "
                            f"the download was deleted (run again to fetch it afresh)")
    os.replace(part, dest)
    log.info("%s: downloaded, %s verified", dest, algorithm)
    return dest


def _fetch(url: str, part: Path, algorithm: str, progress: bool):
    """Bring `part` up to the whole of `url`; returns the hash of its content."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # nothing after byte `have`: the part may already be whole
            total = _range_total(e.headers.get("Content-Range"))
            if total == have:
                return _hash_file(part, algorithm)
            part.unlink()
            raise DownloadError(f"{url}: {part} ({have} bytes) does not fit the file on the server "
                                f"({total} bytes); it was deleted (run again to download afresh)") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"{url}: cannot connect: {reason}") from None

    with response:
        if have and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise DownloadError(f"{url}: asked for bytes from {have}, the server sent them from "
                                    f"{start}; {part} was deleted (run again to download afresh)")
            log.info("%s: resuming at byte %d of %s", url, have, total)
            hasher = _hash_file(part, algorithm)
        else:
            if have:
                log.info("%s: the server ignored the range request; downloading from the start", url)
            have, hasher = 0, hashlib.new(algorithm)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            log.info("downloading %s -> %s", url, part.with_suffix(""))
        done, cut = _copy(response, part, have, total, hasher, progress)
    if (total is not None and done < total) or (total is None and cut is not None):
        of = f" of {total}" if total is not None else ""
        why = f" ({cut})" if cut is not None else ""
        raise DownloadError(f"{url}: the connection broke after {done}{of} bytes{why}; run the same "
                            f"command again to resume from {part}")
    return hasher


def _copy(response, part: Path, have: int, total: int | None, hasher, progress: bool):
    """Append the response body to `part` (truncated first when `have` is 0); returns (bytes in
    the part, the read error that stopped it early or None)."""
    from tqdm import tqdm

    done, cut = have, None
    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name.removesuffix(".part"), disable=not progress, leave=False)
    with open(part, "ab" if have else "wb") as f, bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, short chunked body
                cut = e.__class__.__name__ if not str(e) else str(e)
                break
            if not chunk:
                break
            f.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    return done, cut


def _hash_file(path: str | os.PathLike, algorithm: str):
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher


def _content_range(value: str | None) -> tuple[int, int | None]:
    """'bytes 100-199/200' -> (100, 200); total None when the server wrote '*'."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        raise DownloadError(f"the server answered a range request with Content-Range {value!r}")
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _range_total(value: str | None) -> int | None:
    """'bytes */200' (a 416 answer) -> 200."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match[1]) if match else None


# ---------------------------------------------------------------------------------------------
# Extraction


def is_complete(subset_dir: str | os.PathLike) -> bool:
    """Whether `subset_dir` was extracted whole (it holds the `.complete` marker)."""
    return (Path(subset_dir) / COMPLETE).is_file()


def extract_subset(archive: str | os.PathLike, data_dir: str | os.PathLike, subset: str) -> Path:
    """Extract `LibriSpeech/<subset>/` of `archive` to `<data_dir>/LibriSpeech/<subset>/`, whole
    or not at all; the corpus' top-level files (README.TXT, SPEAKERS.TXT, ...) go beside it."""
    archive, data_dir = Path(archive), Path(data_dir)
    target = data_dir / CORPUS_FOLDER / subset
    if is_complete(target):
        return target
    _refuse_partial(target)
    staging = data_dir / f".{subset}.extracting"  # beside the target: the rename stays on one disk
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        log.info("extracting %s -> %s", archive, target)
        _extract_all(archive, staging)
        found = staging / CORPUS_FOLDER / subset
        if not found.is_dir() or found.is_symlink():
            raise DownloadError(f"{archive.name}: holds no {CORPUS_FOLDER}/{subset}/ folder")
        (found / COMPLETE).write_text(f"{archive.name}\n", encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        for extra in (staging / CORPUS_FOLDER).iterdir():
            if extra.is_file() and not extra.is_symlink():
                os.replace(extra, target.parent / extra.name)
        os.replace(found, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _refuse_partial(target: Path) -> None:
    if target.exists() and not is_complete(target):
        raise DownloadError(f"{target} exists but holds no {COMPLETE} marker, so it may be half "
                            "extracted: remove it to extract it again, or read it as it is with "
                            "--corpus-dir")


# The "data" filter re-checks every member against the disk as it is extracted (Python >= 3.11.4).
_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _extract_all(archive: Path, root: Path) -> None:
    """Extract the whole archive under `root`, streaming it once; raises on the first member
    that could land outside `root` (what was extracted so far stays under `root`)."""
    try:
        with tarfile.open(archive, "r|*") as tar:
            tar.extractall(root, members=_checked(tar, archive, root), **_FILTER)
    except _FILTER_ERROR as e:
        raise DownloadError(f"{archive.name}: refused member {e.tarinfo.name!r}: {e}; nothing was "
                            "extracted") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{archive.name}: damaged archive: {e}") from None
    except OSError as e:
        raise DownloadError(f"{archive.name}: cannot extract: {e}") from None


def _checked(members: Iterable[tarfile.TarInfo], archive: Path, root: Path) -> Iterator[tarfile.TarInfo]:
    """Each member, once it is known to stay under `root`, links included. Paths are resolved
    against the disk, so a member cannot escape through a link extracted before it."""
    real_root = os.path.realpath(root)

    def inside(path: str) -> bool:
        return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root

    for member in members:
        name = member.name
        why = None
        if name.startswith("/"):
            why = "its path is absolute"
        elif ".." in PurePosixPath(name).parts:
            why = "its path holds '..'"
        elif not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            why = "it is a device file or a pipe"
        elif not inside(os.path.join(root, name)):
            why = "it would be written outside the extraction folder"
        elif member.issym() and (os.path.isabs(member.linkname) or not inside(
                os.path.join(root, os.path.dirname(name), member.linkname))):
            why = f"it is a symbolic link to {member.linkname!r}, outside the extraction folder"
        elif member.islnk() and (os.path.isabs(member.linkname)
                                 or not inside(os.path.join(root, member.linkname))):
            why = f"it is a hard link to {member.linkname!r}, outside the extraction folder"
        if why:
            raise DownloadError(f"{archive.name}: refused member {name!r}: {why}; nothing was extracted")
        yield member


# ---------------------------------------------------------------------------------------------
# The whole stage


def check_request(splits: Iterable[str] = (), lm: Iterable[str] = (), mirror: str = DEFAULT_MIRROR) -> None:
    """Raise DownloadError for an unknown subset or LM file name, or a mirror that is no URL."""
    for kind, names, table in (("subset", splits, SUBSETS), ("LM resource", lm, LM_RESOURCES)):
        unknown = [n for n in names if n not in table]
        if unknown:
            raise DownloadError(f"unknown LibriSpeech {kind}{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown)}; valid: {', '.join(table)}")
    if not re.match(r"https?://", mirror):
        raise DownloadError(f"mirror {mirror!r} is not an http:// or https:// URL")


def fetch_lm(names: Iterable[str], data_dir: str | os.PathLike, mirror: str = DEFAULT_MIRROR,
             checksums: str | os.PathLike | None = None, progress: bool = False) -> list[Path]:
    """Download and verify LibriSpeech's LM resources (SLR11: ARPA n-grams, vocabulary, LM text)
    into `<data_dir>/lm/`, kept as published (gzipped where they are); returns their paths."""
    names = list(dict.fromkeys(names))
    check_request(lm=names, mirror=mirror)
    table = read_checksums(checksums) if checksums is not None else None
    wanted = {n: checksum_for(LM_RESOURCES[n], table, source=str(checksums)) for n in names}
    return [download(resource_url(LM_RESOURCES[n], mirror), Path(data_dir) / "lm" / n, digest, progress)
            for n, digest in wanted.items()]


def fetch_splits(splits: Iterable[str], data_dir: str | os.PathLike, mirror: str = DEFAULT_MIRROR,
                 checksums: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Download, verify and extract each LibriSpeech subset not yet complete under
    `<data_dir>/LibriSpeech/`; returns that folder. Archives stay in `data_dir`.

    Every name, checksum and folder is checked before the first byte is fetched. `checksums`
    is a file of `<hexdigest>  <archive name>` lines that replaces the published table.
    """
    splits = list(dict.fromkeys(splits))
    check_request(splits=splits, mirror=mirror)
    data_dir = Path(data_dir)
    corpus = data_dir / CORPUS_FOLDER
    table = read_checksums(checksums) if checksums is not None else None
    todo = {}
    for subset in splits:
        if is_complete(corpus / subset):
            log.info("%s: already extracted in %s", subset, corpus / subset)
            continue
        _refuse_partial(corpus / subset)
        todo[subset] = checksum_for(SUBSETS[subset], table, source=str(checksums))
    for subset, checksum in todo.items():
        resource = SUBSETS[subset]
        archive = download(resource_url(resource, mirror), data_dir / resource.name, checksum, progress)
        extract_subset(archive, data_dir, subset)
    return corpus
