"""Saved models: a trained language model of any family as a folder.

    config.json        the format, the family, the ModelConfig fields, the family's own
                       constructor arguments (``model.family_config()``) and the dtype;
                       and the keys Hugging Face transformers reads
    model.safetensors  the weights (no pickle); the tied embedding and head stored once,
                       as ``head.weight``
    hf_model.py, gam_model.py, baselines.py
                       the code transformers opens the folder with
                       (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``)

>>> from pretrained import from_pretrained, save_pretrained
>>> save_pretrained(model, "models/gam", extra_files={"tokenizer.json": tokenizer.to_str()})
>>> model = from_pretrained("models/gam")                   # the saved family's class, eval mode
>>> model = from_pretrained("models/gam", expect=GAM_Model)  # a folder of another family: ValueError

The family's class comes from ``baselines.FAMILIES``. Needs the ``safetensors`` package,
imported when a model is saved or loaded (so ``import pretrained`` works without it, and a
missing package is an ImportError naming it).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn

from baselines import FAMILIES
from gam_model import CausalLM, ModelConfig

__all__ = ["save_pretrained", "from_pretrained"]

PRETRAINED_FORMAT = "gam-reproduction-causal-lm-v1"  # config.json's "format"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_TIED_KEY = "token_embedding.weight"  # the tied copy of head.weight: not stored
# What Hugging Face transformers needs to open a folder (AutoModelForCausalLM with
# trust_remote_code): the wrapper (hf_model.py) and the modules it builds the model from,
# copied in, and these names in config.json. Written as text, so saving needs no transformers.
HF_CODE_FILES = ("hf_model.py", "gam_model.py", "baselines.py")
HF_MODEL_TYPE = "gam-reproduction"  # hf_model.MODEL_TYPE
HF_CONFIG_CLASS, HF_MODEL_CLASS = "GAMReproductionConfig", "GAMReproductionForCausalLM"  # in hf_model.py
TOKENIZER_NAME, TOKENIZER_CONFIG_NAME = "tokenizer.json", "tokenizer_config.json"
# The roles transformers gives the special tokens of the repository's tokenizers (data.SPECIAL_TOKENS).
SPECIAL_TOKEN_ROLES = {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "[SOS]", "eos_token": "[EOS]"}
_REPO = Path(__file__).resolve().parent


def save_pretrained(model: CausalLM, folder: str | os.PathLike, extra_files: dict | None = None) -> None:
    """Write ``model`` to ``folder``: ``config.json`` and ``model.safetensors`` (see the module
    docstring), loadable by ``from_pretrained``.

    ``extra_files`` ({name: str or bytes}, e.g. ``{"tokenizer.json": tok.to_str()}``) are
    written beside them. The folder also opens in Hugging Face transformers
    (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``): config.json gets
    transformers' keys beside its own, the folder copies of ``HF_CODE_FILES``, and a
    ``tokenizer.json`` among ``extra_files`` a ``tokenizer_config.json`` (unless given).

    Atomic: everything is written into a fresh temporary folder beside ``folder``, which then
    takes its place, so a reader (or a crash) never sees a half-written
    model. ``folder`` may be new, an empty folder or a folder saved here before (replaced;
    files of it that this call does not write, such as a tokenizer, are kept); any other
    non-empty folder is refused (ValueError), never overwritten. A symlink to a folder is
    followed (the folder it names is replaced; the link stays); a mount point, whose place no
    rename can take, is refused. Bad arguments are a ValueError before anything is written;
    weights with NaN or infinite values are saved with a warning.
    """
    save_file = _safetensors("save_file")
    _check_extra_files(extra_files)
    _check_family(model)
    if model.token_embedding.weight is not model.head.weight:
        raise ValueError("the token embedding and the head are no longer tied (one tensor); "
                         "re-tie them (model.token_embedding.weight = model.head.weight) before saving")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED_KEY}
    _warn_if_not_finite(tensors, f"saving to {folder}: the model")
    config = {"format": PRETRAINED_FORMAT, "family": model.family, "model_config": model.config.to_dict(),
              "family_config": model.family_config(), "dtype": str(model.head.weight.dtype).split(".")[-1],
              "tied_weights": {_TIED_KEY: "head.weight"}, **_transformers_config(model.config)}
    files = {**_transformers_files(extra_files or {}, model.config.BLOCK_SIZE), **(extra_files or {})}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, data in files.items():
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    _replace_folder(Path(folder), write)


def from_pretrained(folder: str | os.PathLike, device=None, expect: type | None = None, **kwargs) -> CausalLM:
    """The model saved in ``folder`` by ``save_pretrained``, on ``device`` (default CPU), in eval
    mode (dropout off; ``.train()`` to fine-tune).

    Returns the saved family's class (GAM_Model, TransformerLM or MambaLM). ``expect``, a model
    class, asks for a model of that class: a family class (or a base of it, such as CausalLM)
    loads only its own family (ValueError naming the right class otherwise); a subclass of the
    saved family's class is built as that subclass. ``kwargs`` go to the constructor for what
    is not part of the saved function, e.g. ``block_impl="reference"`` (GAM), ``attention="sdpa"``
    (Transformer), ``impl="torch"`` (Mamba). The weights keep their saved dtype; a file whose
    tensors do not match the config (missing, unexpected, other shapes) is a ValueError. Builds
    the model (random init, with torch's global RNG state restored afterwards), then loads.
    """
    load_file = _safetensors("load_file")
    folder = Path(folder)
    saved = _read_pretrained_config(folder)
    cls = _class_to_build(saved["family"], folder, expect)
    config = ModelConfig(**saved["model_config"])
    device = _load_device(device)
    _check_family_config(cls, saved["family_config"], folder)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = _build(cls, config, {**saved["family_config"], **kwargs}, device)
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except Exception as e:  # missing, truncated or not a safetensors file
        raise ValueError(f"{folder / WEIGHTS_NAME} is unreadable ({' '.join(str(e).split())}); "
                         "save the model again with save_pretrained") from None
    _check_tensor_names(model, tensors, folder)
    _warn_if_not_finite(tensors, f"{folder / WEIGHTS_NAME}:")
    tensors[_TIED_KEY] = tensors["head.weight"]
    model.to(device=device, dtype=getattr(torch, saved["dtype"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # shapes that do not fit config.json
        raise ValueError(f"{folder / WEIGHTS_NAME} does not fit {folder / CONFIG_NAME} "
                         f"({' '.join(str(e).split())[:300]}); save the model again with save_pretrained") from None
    return model.eval()  # as Hugging Face's: ready to use; .train() to fine-tune


def _load_device(device) -> torch.device:
    """torch.device(device), CPU for None; a name torch does not know, or CUDA where there is
    none, is a ValueError naming the choices."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({' '.join(str(e).split())[:120]}); "
                         "give e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available here; load with device='cpu'")
    return device


def _check_family_config(cls: type, family_config: dict, folder: Path) -> None:
    """The saved family arguments are ones the class takes (a config.json edited by hand, or
    written by another version, may name others)."""
    takes = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        return
    unknown = sorted(set(family_config) - set(takes))
    if unknown:
        raise ValueError(f"{folder / CONFIG_NAME}: family_config has arguments {unknown} that {cls.__name__} "
                         f"does not take; save the model again with save_pretrained")


def _warn_if_not_finite(tensors: dict, where: str) -> None:
    """A model whose weights hold NaN or infinity predicts nothing useful: say so, by name."""
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        warnings.warn(f"{where} weights {_first_five(bad)} hold NaN or infinite values (the training "
                      "diverged?); the model's outputs will be NaN", RuntimeWarning, stacklevel=3)


def _transformers_config(c: ModelConfig) -> dict:
    """config.json's keys for transformers: which classes to load (auto_map, from the copied
    hf_model.py) and the usual names of the sizes, for generic tools (derived, not read back)."""
    return {"model_type": HF_MODEL_TYPE, "architectures": [HF_MODEL_CLASS],
            "auto_map": {"AutoConfig": f"hf_model.{HF_CONFIG_CLASS}",
                         "AutoModelForCausalLM": f"hf_model.{HF_MODEL_CLASS}"},
            "vocab_size": c.VOCAB_SIZE, "max_position_embeddings": c.BLOCK_SIZE, "hidden_size": c.N_EMBED,
            "num_hidden_layers": c.N_LAYER, "tie_word_embeddings": True, "use_cache": True}


def _transformers_files(extra_files: dict, block_size: int) -> dict:
    """The code transformers runs (the repository's own modules, imports made package-relative:
    transformers imports a folder's code as a package) and, beside a tokenizer.json, the
    tokenizer_config.json that makes AutoTokenizer a PreTrainedTokenizerFast around it."""
    files = {name: _package_relative((_REPO / name).read_text(encoding="utf-8")) for name in HF_CODE_FILES}
    if TOKENIZER_NAME in extra_files and TOKENIZER_CONFIG_NAME not in extra_files:
        files[TOKENIZER_CONFIG_NAME] = _tokenizer_config(extra_files[TOKENIZER_NAME], block_size)
    return files


def _package_relative(source: str) -> str:
    names = "|".join(re.escape(Path(name).stem) for name in HF_CODE_FILES)
    return re.sub(rf"^from ({names}) import ", r"from .\1 import ", source, flags=re.MULTILINE)


def _tokenizer_config(tokenizer_json: str | bytes, block_size: int) -> str:
    """The special tokens the tokenizer holds, in their transformers roles; no clean-up of
    spaces on decode (so decoded text equals the tokenizers library's)."""
    try:
        added = json.loads(tokenizer_json).get("added_tokens") or []
        tokens = {t["content"] for t in added}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"extra_files['{TOKENIZER_NAME}'] is not a tokenizers JSON file ({e}); "
                         "give tokenizer.to_str()") from None
    roles = {role: token for role, token in SPECIAL_TOKEN_ROLES.items() if token in tokens}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, **roles}
    return json.dumps(config, indent=2) + "\n"


def _safetensors(name: str):
    """safetensors.torch.<name>, imported at the call: a missing package names itself."""
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError("save_pretrained / from_pretrained need the safetensors package: "
                          "pip install safetensors") from None
    return getattr(st, name)


def _family_names() -> str:
    return ", ".join(cls.__name__ for cls in FAMILIES.values())


def _check_family(model) -> None:
    family = getattr(model, "family", None)
    if family not in FAMILIES or not isinstance(model, FAMILIES[family]):
        raise ValueError(f"{type(model).__name__} has no family: save a model of one of "
                         f"{_family_names()} (or of a subclass)")


def _class_to_build(family, folder: Path, expect: type | None) -> type:
    """The class of the saved family, or ``expect`` where it is a subclass of that."""
    if family not in FAMILIES:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown model family {family!r} "
                         f"(known: {', '.join(FAMILIES)})")
    target = FAMILIES[family]
    if expect is None:
        return target
    if not (isinstance(expect, type) and issubclass(expect, CausalLM)):
        raise ValueError(f"expect must be a model class such as {_family_names()}, got {expect!r}")
    if issubclass(expect, target):
        return expect
    if issubclass(target, expect):
        return target
    raise ValueError(f"{folder} holds a {family} model, not a {expect.__name__}; load it as a "
                     f"{target.__name__}: from_pretrained(folder, expect={target.__name__}) or from_pretrained(folder)")


def _build(cls: type, config: ModelConfig, kwargs: dict, device: torch.device) -> CausalLM:
    """The model from_pretrained fills. A family whose build depends on the device takes it as
    an argument (MambaLM: ``impl="auto"`` picks the mixer for the device); the others are
    moved there after loading."""
    if "device" in inspect.signature(cls).parameters:
        kwargs = {"device": device, **kwargs}
    return cls(config, **kwargs)


def _read_pretrained_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or unreadable ({' '.join(str(e).split())}): {folder} is not a "
                         "folder written by save_pretrained (or benchmark.py's models/)") from None
    keys = ("format", "family", "model_config", "family_config", "dtype")
    if not (isinstance(saved, dict) and saved.get("format") == PRETRAINED_FORMAT and all(k in saved for k in keys)
            and isinstance(saved["model_config"], dict) and isinstance(saved["family_config"], dict)):
        raise ValueError(f"{path} is not a saved-model config (format {PRETRAINED_FORMAT!r} with "
                         f"{', '.join(keys)}); save the model with save_pretrained")
    dtype = getattr(torch, str(saved["dtype"]), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{path}: dtype {saved['dtype']!r} is not a floating-point torch dtype (float32, "
                         "bfloat16, ...); save the model again with save_pretrained")
    unknown = set(saved["model_config"]) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {sorted(unknown)}; save the model again")
    return saved


def _check_tensor_names(model: nn.Module, tensors: dict, folder: Path) -> None:
    expected = set(model.state_dict()) - {_TIED_KEY}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {_first_five(missing)}")
        if unexpected:
            what.append(f"unexpected {_first_five(unexpected)}")
        raise ValueError(f"{folder / WEIGHTS_NAME} does not hold the tensors of the model in "
                         f"{folder / CONFIG_NAME} ({'; '.join(what)}); save the model again with save_pretrained")


def _first_five(names: list) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def is_saved_model(folder: Path) -> bool:
    """Whether folder holds a model written by save_pretrained (its config.json says so)."""
    try:
        return json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("format") == PRETRAINED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_extra_files(extra_files: dict | None) -> None:
    """Extra files are plain names inside the model folder (no path, not the model's own
    files) with str or bytes contents: anything else is refused before anything is written."""
    for name, data in (extra_files or {}).items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"extra_files name {name!r} is not a plain file name; give a name such as "
                             "'tokenizer.json' (no folders, no absolute path)")
        if name in (CONFIG_NAME, WEIGHTS_NAME, *HF_CODE_FILES):
            raise ValueError(f"extra_files name {name!r} is the model's own file; save_pretrained writes it")
        if not isinstance(data, (str, bytes)):
            raise ValueError(f"extra_files[{name!r}] is a {type(data).__name__}; give str or bytes")


def _replace_folder(path: Path, write) -> None:
    """Fill a fresh temporary folder beside ``path`` with ``write(folder)``, then put it in
    the place of ``path`` by renames: readers see the old folder or the new, whole one."""
    path = _real_target(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; save into a new or empty folder")
    if path.is_dir() and os.path.ismount(path):
        raise ValueError(f"{path} is a mount point, whose place a saved folder cannot take by a rename; "
                         f"save into a folder inside it, e.g. {path / 'model'}")
    old = path.is_dir() and any(path.iterdir())
    if old and not is_saved_model(path):
        raise ValueError(f"{path} is a non-empty folder that holds no saved model; "
                         "save into a new or empty folder (nothing was written)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in reversed(path.parents) if p.exists() and not p.is_dir())
        raise ValueError(f"{blocker} is a file, so no folder can be made under it; save into another "
                         "folder (nothing was written)") from None
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        _share(tmp)
        for entry in path.iterdir() if old else []:  # what this save does not write is kept
            if not (tmp / entry.name).exists():
                copy = shutil.copytree if entry.is_dir() else shutil.copy2
                copy(entry, tmp / entry.name)
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _real_target(path: Path) -> Path:
    """Where saving into ``path`` writes: the folder a symlink names (so the link keeps
    naming the saved model, instead of being replaced by a folder), else ``path``."""
    if not path.is_symlink():
        return path
    target = path.resolve()  # a loop of links is an OSError (RuntimeError before Python 3.13)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{path} is a link to the file {target}; save into a new or empty folder")
    return target


def _share(tmp: Path) -> None:
    """The permissions of any new file (umask applied): a saved model is meant to be shared,
    and mkdtemp makes 0700, safetensors 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for written in tmp.iterdir():
        os.chmod(written, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` in the place of ``path`` (new or an existing folder) by renames."""
    if not path.is_dir():
        os.replace(tmp, path)
        return
    trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    try:
        os.replace(path, trash / "old")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(trash / "old", path)  # the old model back in its place
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
