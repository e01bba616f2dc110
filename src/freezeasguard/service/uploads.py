"""Taking an uploaded dataset in safely: a zip or tar(.gz) of an image folder with metadata.jsonl
or metadata.csv. Refused with a reason (UploadError, an HTTP 4xx): absolute or ``..`` paths,
links and devices, more files or bytes than the limits (however the archive's headers describe
them: bytes are counted as they are written), images larger than the pixel limit, files that are
not the images they claim to be, captions that name missing files. Files the metadata does not
name (a pickle, a .ckpt) are never opened."""
from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

from freezeasguard.training.data import DataError, load_image_captions


class UploadError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UploadError(f"archive member {name!r}: absolute or '..' paths are refused")
    return path


def _members(data: bytes):
    """(name, open file, declared size) for every regular file; links and devices are refused."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        archive = zipfile.ZipFile(io.BytesIO(data))
        for info in archive.infolist():
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UploadError(f"archive member {info.filename!r} is a symbolic link; links are refused")
            yield info.filename, lambda info=info: archive.open(info)
        return
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError:
        raise UploadError("the upload is neither a zip nor a tar archive") from None
    for member in archive.getmembers():
        if member.isdir():
            continue
        if not member.isfile():
            raise UploadError(f"archive member {member.name!r} is a link or device; only regular files are accepted")
        yield member.name, lambda member=member: archive.extractfile(member)


def unpack(data: bytes, dest: Path, max_unpacked: int, max_files: int) -> int:
    """Unpack into ``dest`` (created; removed again on any error). Returns the bytes written."""
    dest.mkdir(parents=True)
    written, count = 0, 0
    try:
        for name, open_member in _members(data):
            rel = _safe_name(name)
            count += 1
            if count > max_files:
                raise UploadError(f"the upload holds more than {max_files} files", 413)
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_unpacked:
                        raise UploadError(f"the upload unpacks to more than {max_unpacked // 2**20} MB", 413)
                    out.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadError(f"the archive is damaged ({exc})") from None
    except UploadError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return written


def write_loose(parts: dict[str, bytes], dest: Path, max_files: int) -> int:
    """Loose uploaded files into ``dest``: plain names only (no folders, no ``..``)."""
    if len(parts) > max_files:
        raise UploadError(f"the upload holds more than {max_files} files", 413)
    dest.mkdir(parents=True)
    for name, data in parts.items():
        if not name or name != PurePosixPath(name.replace("\\", "/")).name or name in (".", ".."):
            shutil.rmtree(dest, ignore_errors=True)
            raise UploadError(f"file name {name!r}: plain names only (no folders or '..')")
        (dest / name).write_bytes(data)
    return sum(len(d) for d in parts.values())


def dataset_root(folder: Path) -> Path:
    """The folder holding metadata.jsonl/.csv: the top, or the single folder an archive wrapped it in."""
    for candidate in [folder, *[p for p in folder.iterdir() if p.is_dir()]]:
        if (candidate / "metadata.jsonl").exists() or (candidate / "metadata.csv").exists():
            return candidate
    raise UploadError("the upload has no metadata.jsonl or metadata.csv (columns file_name and text) at its top")


def check_dataset(folder: Path, max_pixels: int) -> int:
    """Every image the metadata names: present, an image, within the pixel limit; returns how many."""
    root = dataset_root(folder)
    try:
        data = load_image_captions(root, check_images=False)
    except DataError as exc:
        raise UploadError(str(exc)) from None
    for record in data.records:
        try:
            with Image.open(record.path) as im:      # reads the header only: the size, before any pixels
                w, h = im.size
        except Image.DecompressionBombError as exc:
            raise UploadError(f"{Path(record.path).name}: too large to open ({exc})", 413) from None
        except OSError as exc:
            raise UploadError(f"{Path(record.path).name}: not a readable image ({exc.__class__.__name__})") from None
        if w * h > max_pixels:
            raise UploadError(f"{Path(record.path).name}: {w} x {h} pixels, more than the {max_pixels} allowed", 413)
    try:
        load_image_captions(root)                    # decodes every image: a truncated one is named here
    except DataError as exc:
        raise UploadError(str(exc)) from None
    return len(data.records)
