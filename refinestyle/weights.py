"""Local pretrained weights: every pretrained part loads from a path the user gives.

Nothing is ever downloaded. A missing file is an error that names the file, the
option or environment variable that points to it, and where it is usually obtained.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file that the user must provide is missing.

    env_var: when no path was given at all, the environment variable that was looked up
    (None otherwise); a command line then names its own option for the file (`naming_option`).
    """

    def __init__(self, message: str, *, env_var: str | None = None, what: str = "", obtained_from: str = ""):
        super().__init__(message)
        self.env_var = env_var
        self.what = what
        self.obtained_from = obtained_from

    def naming_option(self, option: str) -> "MissingWeightsError":
        """The same error, telling the user to pass the file with `option` (e.g. "--ir-se50")."""
        if self.env_var is None:
            return self
        return MissingWeightsError(
            _nothing_given(self.what, self.env_var, self.obtained_from, option),
            env_var=self.env_var, what=self.what, obtained_from=self.obtained_from,
        )


def _nothing_given(what: str, env_var: str, obtained_from: str, option: str | None = None) -> str:
    how = f"it with {option}" if option else "its path"
    return (
        f"{what}: no file given. Pass {how} (or set {env_var}). "
        f"It is usually obtained from {obtained_from}; nothing is downloaded."
    )


def resolve_weights(path: str | os.PathLike | None, *, what: str, env_var: str, obtained_from: str) -> Path:
    """Return the local path of a pretrained weights file, or raise MissingWeightsError.

    path: the path the user gave (a CLI option or argument); None falls back to `env_var`.
    what: a human name for the file, e.g. "IR-SE50 ArcFace weights (model_ir_se50.pth)".
    env_var: the environment variable that may hold the path.
    obtained_from: where such a file is usually obtained, for the error message.
    """
    given = path if path is not None else os.environ.get(env_var)
    if given is None:
        raise MissingWeightsError(
            _nothing_given(what, env_var, obtained_from), env_var=env_var, what=what, obtained_from=obtained_from
        )
    resolved = Path(given).expanduser()
    if resolved.is_dir():
        raise MissingWeightsError(f"{what}: {resolved} is a folder; give the weights file itself.")
    if not resolved.is_file():
        raise MissingWeightsError(
            f"{what}: file not found at {resolved}. It is usually obtained from {obtained_from}; "
            f"nothing is downloaded."
        )
    return resolved


def some_of(names, keep: int = 4) -> str:
    """The first `keep` of `names`, comma-separated, and how many there are when that is not all:
    "a, b, c, d, ... (40 in all)". For messages that would otherwise list every tensor of a file."""
    names = [str(name) for name in names]
    if len(names) <= keep:
        return ", ".join(names)
    return f"{', '.join(names[:keep])}, ... ({len(names)} in all)"


def shorten_state_dict_error(message, keep: int = 4, clauses_kept: int = 3) -> str:
    """torch's load_state_dict error in one short line: each "Missing key(s) in state_dict: ..." or
    "Unexpected key(s) ..." clause keeps `keep` names (torch lists them all, hundreds for CLIP),
    and only the first `clauses_kept` clauses (one a size mismatch) are kept."""
    import re

    clauses = []
    for line in str(message).strip().splitlines()[1:] or [str(message).strip()]:
        line = line.strip()
        head, colon, rest = line.partition(": ")
        names = re.findall(r'"([^"]+)"', rest) if colon else []
        clauses.append(f"{head}: {some_of(names, keep)}" if names else line)
    clauses = [clause.rstrip(". ") for clause in clauses if clause]
    if len(clauses) > clauses_kept:
        clauses = clauses[:clauses_kept] + [f"... ({len(clauses) - clauses_kept} more)"]
    return "; ".join(clauses)


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Return `path` as a Path if it names a file; raise FileNotFoundError otherwise.

    what: a human name for the file ("adapter file"); hint: text appended to the message
    (where such a file comes from). A folder gets its own message, since "not found"
    would send the user looking for something that exists.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is a folder, not a file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    return path


def default_device() -> str:
    """'cuda' when a GPU is usable, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write `tensors` ({name: CPU tensor}) and string `metadata` to the safetensors file `path`.

    The folder is created. safetensors 0.8 writes through a private temporary file, which
    leaves the result readable by its owner only; the file gets the mode a plainly created
    file would have (0666 less the umask), so results can be shared like any other output.
    Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path


def _umask() -> int:
    # Linux reports it; elsewhere set-and-restore, which briefly changes it for every thread.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def state_dict_mismatch(expected: dict, state: dict) -> str:
    """How `state` (names -> tensors, about to be loaded) fails to match a module's `expected`
    state_dict: "" when it matches, else its first missing, unexpected and mis-shaped names and
    how many there are of each.
    BatchNorm step counters missing from `state` (files saved before PyTorch 0.4.1; unused in
    eval) are filled in from `expected`, in place."""
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    parts = [f"{label} {some_of(names, 3)}" for label, names in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if names]
    return "; ".join(parts)


def weights_fingerprint(module, parameters=None) -> str:
    """A deterministic sha256 hex digest of an nn.Module's parameters.

    Hashes every parameter (name, shape and float32 little-endian bytes, in name order), so the
    same weights give the same digest on any device and in any dtype the file was read in;
    buffers are left out. Tells whether a resumed run or an adapter meets the weights it was
    trained with (a generator, a first stage, loss networks, CLIP models).
    parameters: None, or {name: tensor} to hash in place of module.named_parameters().
    """
    import torch

    digest = hashlib.sha256()
    named = dict(module.named_parameters()) if parameters is None else parameters
    for name, parameter in sorted(named.items(), key=lambda item: item[0]):
        data = parameter.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(data.shape)).encode())
        digest.update(data.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()
